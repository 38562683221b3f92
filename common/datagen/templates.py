"""The project's own clinical-note templates and specialty vocabulary, rendered with exact PII character spans.

A template is text with `{field}` placeholders. A PII field (patient name,
MRN, dates, ...) is inserted verbatim and its span recorded; a clinical field
expands to text that may itself hold placeholders (a plan item that names the
follow-up date, say), rendered recursively so that every PII value, however
deeply nested, still gets its exact span. Three inline forms draw from the
note's own rng as they are rendered: `{n:LO-HI}` an integer, `{f:LO-HI}` a
float with LO's decimals, `{c:a|b|c}` a choice.

Clinical content hangs off a diagnosis (`Dx`): its presenting complaint, the
labs and vitals it pushes out of range, its imaging study with findings and
impression, its hospital course, drugs and plan. So a note's complaint, labs,
imaging and plan agree with one another, and a model has real structure to
learn: fixed section headers, units and reference ranges, per-specialty
vocabulary, and per-hospital house styles (`style` picks the template variant
a hospital mostly uses).
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Span = tuple[int, int, str]  # (start, end, label), character offsets into the text

_FORMATTER = string.Formatter()
_MAX_DEPTH = 4  # clinical text nests placeholders at most a few levels deep; more means a template loop


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


class TemplateError(KeyError):
    """A template names a field with no value, or nests too deeply."""


def _decimals(number: str) -> int:
    return len(number.split(".", 1)[1]) if "." in number else 0


def _draw(kind: str, spec: str, rng: random.Random) -> str:
    if kind == "c":
        return rng.choice(spec.split("|"))
    lo, hi = spec.split("-", 1)
    if kind == "n":
        return str(rng.randint(int(lo), int(hi)))
    return f"{rng.uniform(float(lo), float(hi)):.{_decimals(lo)}f}"


def render(template: str, values: Mapping[str, str], pii: Mapping[str, tuple[str, str]],
           rng: random.Random) -> tuple[str, list[Span]]:
    """Fill template; pii maps a field to (value, label); returns the text and the PII spans in order."""
    parts: list[str] = []
    spans: list[Span] = []
    pos = 0

    def emit(tmpl: str, depth: int) -> None:
        nonlocal pos
        if depth > _MAX_DEPTH:
            raise TemplateError(f"template nests deeper than {_MAX_DEPTH} levels: {tmpl[:60]!r}")
        for literal, name, spec, _conv in _FORMATTER.parse(tmpl):
            parts.append(literal)
            pos += len(literal)
            if name is None:
                continue
            if name in ("n", "f", "c") and spec:
                text = _draw(name, spec, rng)
            elif name in pii:
                text, label = pii[name]
                spans.append((pos, pos + len(text), label))
            elif name in values:
                emit(values[name], depth + 1)
                continue
            else:
                raise TemplateError(f"template field {{{name}}} has no value")
            parts.append(text)
            pos += len(text)

    emit(template, 0)
    return "".join(parts), spans


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lab:
    name: str
    unit: str
    ref: tuple[float, float]   # reference range printed on the report
    span: tuple[float, float]  # plausible range a value is drawn from
    decimals: int = 0

    def fmt(self, value: float) -> str:
        return f"{value:.{self.decimals}f}"


LABS: dict[str, Lab] = {
    "hgb": Lab("Hemoglobin", "g/dL", (12.0, 16.0), (6.8, 18.2), 1),
    "wbc": Lab("WBC", "x10^9/L", (4.0, 11.0), (0.6, 26.0), 1),
    "anc": Lab("ANC", "x10^9/L", (1.5, 8.0), (0.1, 14.0), 1),
    "plt": Lab("Platelets", "x10^9/L", (150, 400), (38, 690)),
    "na": Lab("Sodium", "mmol/L", (135, 145), (122, 153)),
    "k": Lab("Potassium", "mmol/L", (3.5, 5.1), (2.7, 6.4), 1),
    "hco3": Lab("Bicarbonate", "mmol/L", (22, 29), (6, 34)),
    "cr": Lab("Creatinine", "mg/dL", (0.60, 1.20), (0.35, 4.80), 2),
    "bun": Lab("BUN", "mg/dL", (7, 20), (4, 78)),
    "glu": Lab("Glucose", "mg/dL", (70, 99), (48, 640)),
    "a1c": Lab("HbA1c", "%", (4.0, 5.6), (4.2, 14.5), 1),
    "trop": Lab("Troponin I", "ng/mL", (0.00, 0.04), (0.00, 9.50), 2),
    "bnp": Lab("BNP", "pg/mL", (0, 100), (8, 3400)),
    "ldl": Lab("LDL cholesterol", "mg/dL", (0, 100), (38, 232)),
    "inr": Lab("INR", "", (0.8, 1.2), (0.8, 4.6), 1),
    "alt": Lab("ALT", "U/L", (7, 56), (6, 610)),
    "ast": Lab("AST", "U/L", (10, 40), (8, 540)),
    "alp": Lab("Alkaline phosphatase", "U/L", (44, 147), (30, 820)),
    "bili": Lab("Total bilirubin", "mg/dL", (0.1, 1.2), (0.1, 12.5), 1),
    "alb": Lab("Albumin", "g/dL", (3.5, 5.0), (1.8, 5.3), 1),
    "lipase": Lab("Lipase", "U/L", (13, 60), (8, 2400)),
    "crp": Lab("CRP", "mg/L", (0.0, 10.0), (0.2, 260.0), 1),
    "pct": Lab("Procalcitonin", "ng/mL", (0.00, 0.50), (0.02, 18.00), 2),
    "ph": Lab("pH", "", (7.35, 7.45), (6.98, 7.58), 2),
    "pco2": Lab("pCO2", "mmHg", (35, 45), (22, 88)),
    "po2": Lab("pO2", "mmHg", (80, 100), (42, 110)),
    "lactate": Lab("Lactate", "mmol/L", (0.5, 2.2), (0.4, 7.8), 1),
    "ddimer": Lab("D-dimer", "ng/mL FEU", (0, 500), (90, 7400)),
    "tsh": Lab("TSH", "mIU/L", (0.40, 4.00), (0.01, 48.00), 2),
    "ft4": Lab("Free T4", "ng/dL", (0.80, 1.80), (0.20, 5.20), 2),
    "ca": Lab("Calcium", "mg/dL", (8.5, 10.5), (6.9, 13.8), 1),
    "cortisol": Lab("Cortisol (8 am)", "ug/dL", (5.0, 25.0), (0.8, 42.0), 1),
    "cea": Lab("CEA", "ng/mL", (0.0, 3.0), (0.4, 190.0), 1),
    "ca125": Lab("CA-125", "U/mL", (0, 35), (4, 1600)),
    "ldh": Lab("LDH", "U/L", (140, 280), (110, 1450)),
    "ferritin": Lab("Ferritin", "ng/mL", (30, 400), (3, 2100)),
    "b12": Lab("Vitamin B12", "pg/mL", (200, 900), (90, 1500)),
    "vitd": Lab("25-OH vitamin D", "ng/mL", (30, 100), (5, 110)),
}


@dataclass(frozen=True)
class Med:
    drug: str
    doses: tuple[str, ...]
    route: str
    freqs: tuple[str, ...]


@dataclass(frozen=True)
class Dx:
    """A diagnosis and everything a note about it says; `hints` push labs/vitals High or Low."""

    name: str
    icd10: str
    symptom: str                    # short noun phrase: the chief complaint
    complaint: str                  # the presenting story, with its duration
    hints: Mapping[str, str]        # lab key or vital (bp, hr, rr, temp, spo2) -> "H" | "L"
    study: str | None               # imaging study, or None where a note would have none
    finding: str
    impression: str
    course: str
    meds: tuple[str, ...]           # keys of the specialty's Med table
    plan: tuple[str, ...]
    ages: tuple[int, int] | None = None  # overrides the specialty's age range (years, inclusive)
    sex: str | None = None               # "F" or "M" where the diagnosis implies one
    exam: str = ""                       # the examination finding the diagnosis shows


@dataclass(frozen=True)
class Specialty:
    name: str
    clinic: str
    ages: tuple[int, int]
    history: tuple[str, ...]
    labs: tuple[str, ...]           # the routine panel, after the diagnosis' own labs
    meds: Mapping[str, Med]
    exam: tuple[str, ...]           # unremarkable findings, for notes that do not show the diagnosis' own
    dxs: tuple[Dx, ...]
    note_bias: Mapping[str, float] = field(default_factory=dict)  # note-type weight multipliers


def _dx(name: str, icd10: str, symptom: str, complaint: str, hints: Mapping[str, str], study: str | None,
        finding: str, impression: str, course: str, meds: Sequence[str], plan: Sequence[str],
        ages: tuple[int, int] | None = None, sex: str | None = None, exam: str = "") -> Dx:
    return Dx(name, icd10, symptom, complaint, dict(hints), study, finding, impression, course,
              tuple(meds), tuple(plan), ages, sex, exam)


CARDIOLOGY = Specialty(
    name="cardiology", clinic="Cardiology", ages=(42, 93),
    history=("hypertension", "hyperlipidemia", "type 2 diabetes", "chronic kidney disease stage 3",
             "a 30 pack-year smoking history", "obesity", "prior PCI to the LAD", "paroxysmal atrial fibrillation"),
    labs=("hgb", "na", "k", "cr", "trop", "bnp", "ldl", "inr"),
    meds={
        "aspirin": Med("aspirin", ("81 mg",), "PO", ("daily",)),
        "atorvastatin": Med("atorvastatin", ("40 mg", "80 mg"), "PO", ("nightly",)),
        "metoprolol": Med("metoprolol succinate", ("25 mg", "50 mg", "100 mg"), "PO", ("daily",)),
        "lisinopril": Med("lisinopril", ("5 mg", "10 mg", "20 mg"), "PO", ("daily",)),
        "amlodipine": Med("amlodipine", ("5 mg", "10 mg"), "PO", ("daily",)),
        "furosemide": Med("furosemide", ("20 mg", "40 mg", "80 mg"), "PO", ("daily", "BID")),
        "apixaban": Med("apixaban", ("2.5 mg", "5 mg"), "PO", ("BID",)),
        "clopidogrel": Med("clopidogrel", ("75 mg",), "PO", ("daily",)),
        "spironolactone": Med("spironolactone", ("12.5 mg", "25 mg"), "PO", ("daily",)),
        "sacubitril": Med("sacubitril-valsartan", ("24/26 mg", "49/51 mg"), "PO", ("BID",)),
        "nitroglycerin": Med("nitroglycerin", ("0.4 mg",), "SL", ("q5min PRN chest pain",)),
        "colchicine": Med("colchicine", ("0.5 mg",), "PO", ("BID",)),
        "ibuprofen": Med("ibuprofen", ("600 mg",), "PO", ("TID with food",)),
    },
    exam=("regular rate and rhythm, no murmurs", "lungs clear, no peripheral edema", "warm and well perfused"),
    dxs=(
        _dx("NSTEMI", "I21.4", "chest pressure",
            "substernal chest pressure radiating to the left arm for {n:2-9} hours", {"trop": "H"},
            "Chest X-ray, portable AP",
            "Heart size normal. Lungs clear without consolidation, effusion or pneumothorax.",
            "No acute cardiopulmonary process.",
            "Troponin I peaked at {f:0.8-9.2} ng/mL. Angiography showed a {n:70-99}% stenosis of the "
            "{c:proximal LAD|mid RCA|left circumflex}, treated with a drug-eluting stent.",
            ("aspirin", "clopidogrel", "atorvastatin", "metoprolol"),
            ("Dual antiplatelet therapy for 12 months.", "Cardiac rehabilitation referral.",
             "Fasting lipid panel in 6 weeks."),
            exam="diaphoretic, regular rhythm, lungs clear"),
        _dx("Acute on chronic systolic heart failure", "I50.23", "shortness of breath",
            "worsening shortness of breath, orthopnea and leg swelling over {n:3-14} days",
            {"bnp": "H", "spo2": "L", "na": "L"}, "Chest X-ray, PA and lateral",
            "Cardiomegaly with vascular congestion, interstitial edema and small bilateral pleural effusions.",
            "Congestive heart failure with pulmonary edema.",
            "Diuresed with IV furosemide, net negative {f:3.5-9.0} L and weight down {f:2.5-7.5} kg. "
            "Echocardiogram: LVEF {n:15-35}%.",
            ("furosemide", "sacubitril", "metoprolol", "spironolactone"),
            ("Daily weights; call if gaining more than 2 kg in 3 days.", "Fluid restriction of 1.5 L per day.",
             "Basic metabolic panel in 1 week."),
            exam="JVP 10 cm, bibasilar crackles, 2+ pitting edema to the knees"),
        _dx("Atrial fibrillation with rapid ventricular response", "I48.91", "palpitations",
            "palpitations and lightheadedness for {n:2-20} hours", {"hr": "H", "tsh": "L"},
            "Transthoracic echocardiogram",
            "Left atrium dilated at {n:42-55} mm. LVEF {n:50-65}%. No valvular vegetation or thrombus.",
            "Left atrial enlargement with preserved systolic function.",
            "Rate controlled with IV then oral metoprolol. CHA2DS2-VASc score {n:2-6}; apixaban started.",
            ("metoprolol", "apixaban"),
            ("Continue anticoagulation; bleeding precautions reviewed.",
             "Holter monitor in 4 weeks to assess rate control.", "Consider cardioversion if symptoms persist."),
            exam="irregularly irregular rhythm, no murmurs"),
        _dx("Hypertensive urgency", "I16.0", "headache",
            "headache and blurred vision with home blood pressures above 190 for {n:2-4} days", {"bp": "H"},
            "CT head without contrast", "No intracranial hemorrhage, mass effect or acute infarct.",
            "No acute intracranial abnormality.",
            "Blood pressure lowered gradually with oral agents over 24 hours; no end-organ damage.",
            ("lisinopril", "amlodipine"),
            ("Home blood pressure log twice daily.", "Low-sodium diet counseling.",
             "Creatinine and potassium in 2 weeks."),
            exam="no focal neurologic deficit, no papilledema"),
        _dx("Severe aortic stenosis", "I35.0", "exertional chest tightness",
            "exertional chest tightness and near-syncope for {n:2-10} weeks", {"bnp": "H"},
            "Transthoracic echocardiogram",
            "Calcified aortic valve, peak velocity {f:4.1-5.4} m/s, mean gradient {n:41-68} mmHg, "
            "valve area {f:0.5-0.9} cm2. LVEF {n:45-65}%.", "Severe aortic stenosis.",
            "Reviewed by the structural heart team and scheduled for transcatheter valve replacement.",
            ("aspirin", "atorvastatin"),
            ("CT angiography of the aorta for TAVR planning.", "Avoid strenuous exertion until the valve is replaced.",
             "Dental clearance before the procedure."),
            exam="harsh 3/6 systolic murmur at the right upper sternal border radiating to the carotids"),
        _dx("Acute pericarditis", "I30.9", "pleuritic chest pain",
            "sharp chest pain that eases when leaning forward, for {n:2-6} days", {"crp": "H"},
            "Chest X-ray, PA and lateral", "Normal cardiac silhouette. No pleural effusion.",
            "No acute cardiopulmonary abnormality.",
            "ECG showed diffuse ST elevation with PR depression; small pericardial effusion on echocardiogram.",
            ("ibuprofen", "colchicine"),
            ("Colchicine for 3 months.", "No competitive sport until symptoms and CRP resolve.",
             "Repeat echocardiogram in 4 weeks."),
            exam="pericardial friction rub at the left sternal border"),
    ),
    note_bias={"lab": 1.2},
)

ONCOLOGY = Specialty(
    name="oncology", clinic="Oncology", ages=(34, 86),
    history=("hypertension", "type 2 diabetes", "a 40 pack-year smoking history", "hypothyroidism",
             "osteoarthritis", "COPD", "prior cholecystectomy"),
    labs=("hgb", "wbc", "anc", "plt", "cr", "alt", "bili", "alb", "ldh"),
    meds={
        "ondansetron": Med("ondansetron", ("8 mg",), "PO", ("q8h PRN nausea",)),
        "dexamethasone": Med("dexamethasone", ("4 mg", "8 mg"), "PO", ("daily", "BID")),
        "pembrolizumab": Med("pembrolizumab", ("200 mg",), "IV", ("every 3 weeks",)),
        "carboplatin": Med("carboplatin", ("AUC 5", "AUC 6"), "IV", ("every 21 days",)),
        "oxaliplatin": Med("oxaliplatin", ("85 mg/m2",), "IV", ("every 14 days",)),
        "capecitabine": Med("capecitabine", ("1000 mg/m2",), "PO", ("BID on days 1-14",)),
        "letrozole": Med("letrozole", ("2.5 mg",), "PO", ("daily",)),
        "rituximab": Med("rituximab", ("375 mg/m2",), "IV", ("day 1 of each cycle",)),
        "prednisone": Med("prednisone", ("100 mg",), "PO", ("daily on days 1-5",)),
        "allopurinol": Med("allopurinol", ("300 mg",), "PO", ("daily",)),
        "filgrastim": Med("filgrastim", ("300 mcg", "480 mcg"), "SC", ("daily",)),
        "cefepime": Med("cefepime", ("2 g",), "IV", ("q8h",)),
        "morphine": Med("morphine ER", ("15 mg", "30 mg"), "PO", ("q12h",)),
        "oxycodone": Med("oxycodone", ("5 mg", "10 mg"), "PO", ("q4h PRN pain",)),
        "senna": Med("senna", ("8.6 mg",), "PO", ("nightly",)),
    },
    exam=("no palpable lymphadenopathy", "port site clean without erythema", "ECOG performance status {n:0-2}"),
    dxs=(
        _dx("Non-small cell lung cancer", "C34.11", "cough",
            "persistent cough and {n:4-12} kg weight loss over {n:2-5} months", {"ldh": "H", "hgb": "L"},
            "CT chest with contrast",
            "{f:2.1-6.5} cm spiculated mass in the right upper lobe with hilar and mediastinal nodes up to "
            "{f:1.2-2.8} cm.", "Right upper lobe mass with nodal disease, consistent with primary lung cancer.",
            "Biopsy confirmed adenocarcinoma, PD-L1 {n:1-90}%. Cycle {n:1-4} of carboplatin-pemetrexed with "
            "pembrolizumab given without complication.",
            ("carboplatin", "pembrolizumab", "ondansetron", "dexamethasone"),
            ("Restaging CT after cycle 4.", "Tumor board review of radiation options.",
             "Smoking cessation counseling provided."),
            exam="decreased breath sounds at the right apex"),
        _dx("Breast cancer, hormone receptor positive", "C50.911", "breast lump",
            "a painless {side} breast lump first noticed {n:3-10} weeks ago", {},
            "Diagnostic mammogram and breast ultrasound",
            "Irregular hypoechoic mass at {n:1-12} o'clock measuring {f:1.1-4.8} cm with an abnormal axillary node.",
            "BI-RADS 5: highly suggestive of malignancy.",
            "Core biopsy showed invasive ductal carcinoma, ER positive, HER2 negative; lumpectomy with "
            "sentinel node biopsy performed.",
            ("letrozole", "ondansetron", "oxycodone"),
            ("Radiation oncology consultation.", "Endocrine therapy for 5 years.", "Baseline bone density scan."),
            sex="F",
            exam="firm {side} breast mass with a palpable axillary node"),
        _dx("Sigmoid colon adenocarcinoma with liver metastases", "C18.7", "rectal bleeding",
            "rectal bleeding and a change in bowel habits for {n:2-8} weeks", {"hgb": "L", "cea": "H", "alp": "H"},
            "CT abdomen and pelvis with contrast",
            "Sigmoid wall thickening over {f:3.0-7.5} cm with {n:2-5} hypodense liver lesions, the largest "
            "{f:1.0-4.2} cm.", "Sigmoid colon malignancy with hepatic metastases.",
            "Started FOLFOX; cycle {n:1-8} given with grade 1 peripheral neuropathy.",
            ("oxaliplatin", "capecitabine", "ondansetron"),
            ("CEA with each cycle.", "Surgical oncology review for liver-directed therapy.",
             "Mismatch repair testing on the resection specimen."),
            exam="liver edge palpable 3 cm below the costal margin"),
        _dx("Febrile neutropenia", "D70.1", "fever",
            "fever to {f:38.3-39.8} °C {n:7-12} days after chemotherapy", {"wbc": "L", "anc": "L", "temp": "H",
                                                                             "hr": "H"},
            "Chest X-ray, PA and lateral", "No focal consolidation, pleural effusion or pneumothorax.",
            "No radiographic evidence of pneumonia.",
            "Blood cultures drawn and cefepime started within one hour; afebrile after {n:2-4} days with count "
            "recovery.",
            ("cefepime", "filgrastim"),
            ("Pegfilgrastim with subsequent cycles.", "Reduce the next cycle's dose by 20%.",
             "Neutropenic precautions reviewed."),
            exam="grade 2 oral mucositis, port site without erythema"),
        _dx("Diffuse large B-cell lymphoma", "C83.30", "night sweats",
            "night sweats and enlarging neck nodes for {n:4-10} weeks", {"ldh": "H"},
            "PET-CT skull base to mid-thigh",
            "FDG-avid cervical, mediastinal and retroperitoneal lymph nodes, SUVmax {f:8.5-24.0}.",
            "Stage {c:II|III|IV} lymphoma by Lugano criteria.",
            "Excisional biopsy confirmed DLBCL; cycle 1 of R-CHOP given with tumor lysis precautions.",
            ("rituximab", "prednisone", "allopurinol", "ondansetron"),
            ("Interim PET after cycle 3.", "Echocardiogram before anthracycline.", "Hepatitis B serology reviewed."),
            exam="bulky non-tender cervical lymphadenopathy"),
        _dx("Bone metastases", "C79.51", "bone pain",
            "worsening {c:low back|hip|rib} pain for {n:2-8} weeks", {"ca": "H", "alp": "H"},
            "MRI thoracolumbar spine with and without contrast",
            "Enhancing lesions in the T{n:6-12} and L{n:1-4} vertebral bodies without cord compression.",
            "Osseous metastatic disease without epidural extension.",
            "Pain controlled with long-acting morphine; palliative spine radiation started.",
            ("morphine", "oxycodone", "senna", "dexamethasone"),
            ("Palliative radiation in 5 fractions.", "Bone-modifying agent after dental review.",
             "Palliative care follow-up for symptom control."),
            exam="point tenderness over the lower thoracic spine, strength 5/5"),
    ),
    note_bias={"radiology": 1.5, "medication_list": 1.2},
)

PEDIATRICS = Specialty(
    name="pediatrics", clinic="Pediatrics", ages=(0, 17),
    history=("no significant past medical history", "mild intermittent asthma", "eczema",
             "prematurity (born at {n:32-36} weeks)", "recurrent ear infections"),
    labs=("wbc", "hgb", "plt", "na", "k", "glu", "crp"),
    meds={
        "amoxicillin": Med("amoxicillin", ("45 mg/kg/day", "90 mg/kg/day"), "PO", ("divided BID",)),
        "acetaminophen": Med("acetaminophen", ("15 mg/kg",), "PO", ("q6h PRN fever",)),
        "ibuprofen": Med("ibuprofen", ("10 mg/kg",), "PO", ("q8h PRN pain",)),
        "albuterol": Med("albuterol", ("2.5 mg",), "nebulized", ("q4h", "q2h PRN wheeze")),
        "dexamethasone": Med("dexamethasone", ("0.6 mg/kg",), "PO", ("once",)),
        "prednisolone": Med("prednisolone", ("1 mg/kg/day",), "PO", ("daily for 5 days",)),
        "fluticasone": Med("fluticasone", ("88 mcg",), "inhaled", ("BID",)),
        "ondansetron": Med("ondansetron", ("0.15 mg/kg",), "PO", ("q8h PRN vomiting",)),
        "ors": Med("oral rehydration solution", ("50 mL/kg",), "PO", ("over 4 hours",)),
        "ceftriaxone": Med("ceftriaxone", ("50 mg/kg",), "IV", ("daily",)),
        "glargine": Med("insulin glargine", ("0.3 units/kg",), "SC", ("nightly",)),
        "lispro": Med("insulin lispro", ("per carbohydrate ratio",), "SC", ("with meals",)),
    },
    exam=("active and playful, well hydrated", "capillary refill under 2 seconds", "lungs clear, no rash"),
    dxs=(
        _dx("RSV bronchiolitis", "J21.0", "cough and fast breathing",
            "{n:2-5} days of cough, runny nose and increased work of breathing", {"spo2": "L", "rr": "H"},
            "Chest X-ray, AP", "Peribronchial thickening and hyperinflation without focal consolidation.",
            "Findings consistent with viral bronchiolitis.",
            "RSV PCR positive. Nasal suction and high-flow oxygen for {n:2-3} days; feeding improved.",
            ("acetaminophen",),
            ("Return for breathing difficulty or poor feeding.", "Nasal saline and suction before feeds.",
             "Pediatrician review in 2 days."), ages=(0, 1),
            exam="nasal flaring, subcostal retractions and scattered crackles"),
        _dx("Acute otitis media", "H66.90", "ear pain",
            "ear pulling, fever and irritability for {n:2-3} days", {"temp": "H"}, None, "", "",
            "Started oral amoxicillin; fever resolved within 48 hours.",
            ("amoxicillin", "ibuprofen"),
            ("Complete 10 days of amoxicillin.", "Ear recheck in 3 to 4 weeks.",
             "Return if fever persists beyond 72 hours."), ages=(1, 6),
            exam="{side} tympanic membrane bulging and erythematous"),
        _dx("Asthma exacerbation", "J45.41", "wheeze",
            "wheeze and shortness of breath after a cold, for {n:2-3} days", {"spo2": "L", "rr": "H"},
            "Chest X-ray, PA and lateral",
            "Hyperinflation with peribronchial cuffing. No pneumothorax or consolidation.",
            "Reactive airway disease without pneumonia.",
            "Albuterol every 20 minutes for 3 doses and oral dexamethasone; weaned to every 4 hours.",
            ("albuterol", "dexamethasone", "fluticasone"),
            ("Asthma action plan reviewed with the family.", "Start inhaled fluticasone 88 mcg BID.",
             "Primary care follow-up within 1 week."), ages=(4, 17),
            exam="subcostal retractions with diffuse expiratory wheeze"),
        _dx("Gastroenteritis with moderate dehydration", "A08.4", "vomiting and diarrhea",
            "vomiting and watery diarrhea for {n:2-4} days with fewer wet diapers", {"hco3": "L", "hr": "H"},
            "Abdominal ultrasound",
            "Fluid-filled bowel loops with hyperperistalsis. No intussusception. Appendix not visualized.",
            "No sonographic evidence of intussusception.",
            "Ondansetron and oral rehydration; tolerating fluids after {n:6-18} hours.",
            ("ondansetron", "ors"),
            ("Small frequent sips of oral rehydration solution.", "Return for blood in stool or lethargy.",
             "Resume normal diet as tolerated."), ages=(0, 9),
            exam="dry mucous membranes, capillary refill 3 seconds"),
        _dx("Community-acquired pneumonia", "J18.9", "fever and cough",
            "fever and cough for {n:3-7} days with fast breathing", {"wbc": "H", "crp": "H", "temp": "H"},
            "Chest X-ray, PA and lateral", "Focal consolidation in the {side} lower lobe. No pleural effusion.",
            "Lobar pneumonia.", "IV ceftriaxone, switched to oral amoxicillin once afebrile for 24 hours.",
            ("ceftriaxone", "amoxicillin", "acetaminophen"),
            ("Complete 7 days of antibiotics.", "Recheck in 48 hours to confirm improvement.",
             "Return for increased work of breathing."), ages=(1, 17),
            exam="coarse crackles at the {side} base"),
        _dx("New-onset type 1 diabetes with DKA", "E10.10", "excessive thirst",
            "polyuria, polydipsia and {n:2-5} kg weight loss over {n:2-4} weeks",
            {"glu": "H", "hco3": "L", "a1c": "H"}, None, "", "",
            "IV insulin and fluids per DKA protocol; moved to subcutaneous insulin after {n:18-36} hours.",
            ("glargine", "lispro"),
            ("Diabetes education completed with parents.", "Glucose checks before meals and at bedtime.",
             "Pediatric endocrinology clinic in 1 week."), ages=(3, 17),
            exam="Kussmaul breathing, dry mucous membranes"),
    ),
    note_bias={"referral": 0.6, "medication_list": 0.7},
)

NEUROLOGY = Specialty(
    name="neurology", clinic="Neurology", ages=(19, 90),
    history=("hypertension", "hyperlipidemia", "migraine", "atrial fibrillation", "depression",
             "obstructive sleep apnea", "a prior TIA"),
    labs=("hgb", "wbc", "plt", "na", "glu", "cr", "inr", "ldl", "a1c", "b12"),
    meds={
        "aspirin": Med("aspirin", ("81 mg",), "PO", ("daily",)),
        "clopidogrel": Med("clopidogrel", ("75 mg",), "PO", ("daily",)),
        "atorvastatin": Med("atorvastatin", ("40 mg", "80 mg"), "PO", ("nightly",)),
        "levetiracetam": Med("levetiracetam", ("500 mg", "750 mg", "1000 mg"), "PO", ("BID",)),
        "lamotrigine": Med("lamotrigine", ("25 mg", "50 mg", "100 mg"), "PO", ("BID",)),
        "sumatriptan": Med("sumatriptan", ("50 mg", "100 mg"), "PO", ("PRN migraine, max 2 doses a day",)),
        "topiramate": Med("topiramate", ("25 mg", "50 mg"), "PO", ("BID",)),
        "amitriptyline": Med("amitriptyline", ("10 mg", "25 mg"), "PO", ("nightly",)),
        "carbidopa": Med("carbidopa-levodopa", ("25/100 mg",), "PO", ("TID",)),
        "donepezil": Med("donepezil", ("5 mg", "10 mg"), "PO", ("nightly",)),
        "methylpred": Med("methylprednisolone", ("1 g",), "IV", ("daily for 5 days",)),
        "ocrelizumab": Med("ocrelizumab", ("600 mg",), "IV", ("every 6 months",)),
    },
    exam=("alert and oriented x3, cranial nerves II-XII intact",
          "sensation intact to light touch, reflexes 2+ and symmetric", "gait steady"),
    dxs=(
        _dx("Acute ischemic stroke", "I63.519", "sudden weakness",
            "sudden {side}-sided weakness and slurred speech, last known well {n:2-5} hours before arrival",
            {"bp": "H"}, "MRI brain without contrast",
            "Restricted diffusion in the {other_side} middle cerebral artery territory measuring {f:1.2-4.5} cm. "
            "No hemorrhage.", "Acute ischemic infarct in the MCA territory.",
            "NIHSS {n:3-16} on arrival; IV thrombolysis given, NIHSS {n:0-4} at 24 hours.",
            ("aspirin", "clopidogrel", "atorvastatin"),
            ("Dual antiplatelet therapy for 21 days, then aspirin alone.", "Inpatient rehabilitation evaluation.",
             "30-day cardiac monitor to look for atrial fibrillation."),
            exam="{side} pronator drift, strength 3/5 in the {side} arm, dysarthria"),
        _dx("Focal epilepsy with a generalized seizure", "G40.209", "seizure",
            "a witnessed generalized tonic-clonic seizure lasting {n:2-4} minutes", {"lactate": "H"},
            "MRI brain with and without contrast",
            "Mild {side} mesial temporal sclerosis. No mass or abnormal enhancement.",
            "Findings suggest mesial temporal sclerosis as the seizure focus.",
            "EEG showed {side} temporal sharp waves; levetiracetam started with no further events.",
            ("levetiracetam", "lamotrigine"),
            ("No driving for 6 months; seizure precautions reviewed.", "Watch for mood changes on levetiracetam.",
             "Follow-up EEG in 3 months."),
            exam="post-ictal drowsiness, tongue laceration, no focal deficit"),
        _dx("Status migrainosus", "G43.011", "headache",
            "a throbbing {side} temporal headache with photophobia and nausea for {n:2-3} days", {},
            "CT head without contrast", "No intracranial hemorrhage, mass or hydrocephalus.",
            "Normal noncontrast head CT.",
            "Headache resolved with IV metoclopramide, diphenhydramine and fluids.",
            ("sumatriptan", "topiramate", "amitriptyline"),
            ("Headache diary; acute medication no more than 2 days a week.", "Start topiramate for prevention.",
             "Return for sudden severe headache or a new deficit."),
            exam="photophobic, no meningism, normal fundi"),
        _dx("Multiple sclerosis relapse with optic neuritis", "G35", "blurred vision",
            "blurred vision in the {side} eye with pain on eye movement for {n:3-10} days", {},
            "MRI brain and orbits with and without contrast",
            "{n:4-15} periventricular and juxtacortical T2 lesions, {n:1-3} enhancing; the {side} optic nerve "
            "enhances.", "Active demyelinating disease consistent with multiple sclerosis.",
            "IV methylprednisolone 1 g daily for 5 days with partial recovery of visual acuity.",
            ("methylpred", "ocrelizumab"),
            ("Start ocrelizumab as disease-modifying therapy.", "Ophthalmology follow-up for visual fields.",
             "Vitamin D level and repletion."),
            exam="relative afferent pupillary defect on the {side}"),
        _dx("Parkinson disease", "G20.A1", "tremor",
            "progressive slowness and a resting tremor of the {side} hand over {n:6-18} months", {},
            "DaTscan SPECT", "Asymmetric reduced tracer uptake in the posterior putamen.",
            "Presynaptic dopaminergic deficit, consistent with Parkinson disease.",
            "Carbidopa-levodopa started with clear improvement in bradykinesia.",
            ("carbidopa",),
            ("Physical therapy for gait and balance.", "Titrate carbidopa-levodopa to 1 tablet three times daily.",
             "Screen for orthostatic hypotension at the next visit."), ages=(52, 88),
            exam="resting tremor of the {side} hand with cogwheel rigidity"),
        _dx("Alzheimer disease", "G30.1", "memory loss",
            "memory decline over {n:2-3} years, recently getting lost while driving", {},
            "MRI brain without contrast",
            "Bilateral hippocampal volume loss and diffuse cortical atrophy; mild chronic small vessel changes.",
            "Atrophy pattern suggestive of Alzheimer disease.",
            "MoCA {n:14-22}/30. Donepezil started; caregiver support discussed.",
            ("donepezil",),
            ("Formal driving evaluation.", "Social work referral for caregiver support.",
             "Repeat cognitive testing in 6 months."), ages=(64, 93),
            exam="oriented to person only, recalls 1 of 3 words"),
    ),
    note_bias={"radiology": 1.5},
)

PULMONOLOGY = Specialty(
    name="pulmonology", clinic="Pulmonology", ages=(28, 89),
    history=("COPD", "a 45 pack-year smoking history", "obstructive sleep apnea", "hypertension", "GERD",
             "obesity", "heart failure with preserved ejection fraction"),
    labs=("wbc", "hgb", "na", "cr", "crp", "ph", "pco2", "po2"),
    meds={
        "albuterol": Med("albuterol MDI", ("2 puffs",), "inhaled", ("q4h PRN",)),
        "tiotropium": Med("tiotropium", ("18 mcg",), "inhaled", ("daily",)),
        "budesonide": Med("budesonide-formoterol", ("160/4.5 mcg 2 puffs",), "inhaled", ("BID",)),
        "duoneb": Med("ipratropium-albuterol", ("3 mL",), "nebulized", ("q6h",)),
        "prednisone": Med("prednisone", ("40 mg",), "PO", ("daily for 5 days",)),
        "azithromycin": Med("azithromycin", ("500 mg",), "PO", ("daily for 3 days",)),
        "ceftriaxone": Med("ceftriaxone", ("1 g", "2 g"), "IV", ("daily",)),
        "enoxaparin": Med("enoxaparin", ("1 mg/kg",), "SC", ("q12h",)),
        "apixaban": Med("apixaban", ("10 mg",), "PO", ("BID for 7 days, then 5 mg BID",)),
        "pirfenidone": Med("pirfenidone", ("801 mg",), "PO", ("TID with meals",)),
        "oxygen": Med("oxygen", ("2 L/min", "3 L/min"), "nasal cannula", ("with exertion", "continuous")),
    },
    exam=("clear to auscultation bilaterally", "no accessory muscle use", "no clubbing or edema"),
    dxs=(
        _dx("COPD exacerbation", "J44.1", "shortness of breath",
            "increased dyspnea and purulent sputum for {n:2-6} days", {"pco2": "H", "ph": "L", "spo2": "L"},
            "Chest X-ray, PA and lateral", "Hyperinflated lungs with flattened diaphragms. No focal consolidation.",
            "Emphysematous changes without acute infiltrate.",
            "Nebulized bronchodilators, prednisone and azithromycin; BiPAP for {n:2-3} nights.",
            ("prednisone", "azithromycin", "tiotropium", "duoneb"),
            ("Pulmonary rehabilitation referral.", "Inhaler technique reviewed.", "Spirometry when stable."),
            exam="diffuse expiratory wheeze with prolonged expiration"),
        _dx("Lobar pneumonia", "J18.1", "productive cough",
            "fever, productive cough and pleuritic pain for {n:2-7} days",
            {"wbc": "H", "crp": "H", "pct": "H", "temp": "H"}, "Chest X-ray, PA and lateral",
            "Dense consolidation in the {side} lower lobe with air bronchograms.", "Lobar pneumonia.",
            "Ceftriaxone and azithromycin; oxygen weaned to room air by day {n:2-4}.",
            ("ceftriaxone", "azithromycin"),
            ("Oral antibiotics to complete 5 to 7 days.", "Repeat chest X-ray in 6 to 8 weeks.",
             "Pneumococcal vaccination offered."),
            exam="bronchial breath sounds at the {side} base"),
        _dx("Acute pulmonary embolism", "I26.99", "pleuritic chest pain",
            "sudden pleuritic chest pain and dyspnea {n:2-10} days after a long flight",
            {"ddimer": "H", "hr": "H", "spo2": "L"}, "CT pulmonary angiogram",
            "Filling defects in the {side} lower lobe segmental arteries. RV/LV ratio {f:0.7-0.9}.",
            "Acute pulmonary embolism without right heart strain.",
            "Anticoagulated with enoxaparin, then transitioned to apixaban.",
            ("enoxaparin", "apixaban"),
            ("Anticoagulation for at least 3 months.", "Compression stockings for leg symptoms.",
             "Hematology review if it recurs."),
            exam="tachycardic, lungs clear, {side} calf swelling"),
        _dx("Idiopathic pulmonary fibrosis", "J84.112", "exertional dyspnea",
            "progressive exertional dyspnea and dry cough over {n:6-24} months", {"spo2": "L"},
            "High-resolution CT chest",
            "Subpleural basal-predominant reticulation with honeycombing and traction bronchiectasis.",
            "Usual interstitial pneumonia pattern.",
            "FVC {n:55-78}% predicted, DLCO {n:35-60}% predicted; antifibrotic therapy started.",
            ("pirfenidone", "oxygen"),
            ("Six-minute walk test every 6 months.", "Lung transplant referral discussed.",
             "Liver function tests monthly on pirfenidone."),
            exam="fine bibasilar velcro crackles and digital clubbing"),
        _dx("Malignant pleural effusion", "J91.0", "breathlessness",
            "progressive breathlessness for {n:2-6} weeks", {"ldh": "H"}, "Chest X-ray, PA and lateral",
            "Large {side} pleural effusion with contralateral mediastinal shift.", "Large pleural effusion.",
            "Thoracentesis removed {f:1.0-1.8} L of exudative fluid; cytology showed adenocarcinoma cells.",
            ("albuterol", "oxygen"),
            ("Oncology referral.", "Repeat chest X-ray in 1 week.",
             "Indwelling pleural catheter if the effusion reaccumulates."),
            exam="dullness and absent breath sounds at the {side} base"),
        _dx("Obstructive sleep apnea", "G47.33", "daytime sleepiness",
            "loud snoring, witnessed apneas and daytime sleepiness for {n:2-5} years", {}, None, "", "",
            "Polysomnography showed an apnea-hypopnea index of {n:18-64} events per hour.",
            (),
            ("CPAP titration study.", "Weight loss counseling.", "Avoid sedatives and alcohol before bed."),
            exam="crowded oropharynx, neck circumference {n:42-48} cm"),
    ),
)

GASTROENTEROLOGY = Specialty(
    name="gastroenterology", clinic="Gastroenterology", ages=(24, 87),
    history=("GERD", "obesity", "alcohol use disorder", "type 2 diabetes", "hypertension", "prior appendectomy",
             "iron deficiency anemia"),
    labs=("hgb", "wbc", "plt", "alt", "ast", "alp", "bili", "alb", "inr", "cr"),
    meds={
        "pantoprazole": Med("pantoprazole", ("40 mg",), "PO", ("daily", "BID")),
        "lactulose": Med("lactulose", ("20 g",), "PO", ("TID, titrate to 3 soft stools",)),
        "rifaximin": Med("rifaximin", ("550 mg",), "PO", ("BID",)),
        "spironolactone": Med("spironolactone", ("100 mg",), "PO", ("daily",)),
        "furosemide": Med("furosemide", ("40 mg",), "PO", ("daily",)),
        "prednisone": Med("prednisone", ("40 mg",), "PO", ("daily, taper by 5 mg weekly",)),
        "infliximab": Med("infliximab", ("5 mg/kg",), "IV", ("at weeks 0, 2 and 6",)),
        "ceftriaxone": Med("ceftriaxone", ("1 g",), "IV", ("daily",)),
        "ondansetron": Med("ondansetron", ("4 mg",), "IV", ("q6h PRN nausea",)),
        "hydromorphone": Med("hydromorphone", ("0.5 mg",), "IV", ("q3h PRN pain",)),
        "iron": Med("ferrous sulfate", ("325 mg",), "PO", ("every other day",)),
        "peg": Med("polyethylene glycol", ("17 g",), "PO", ("daily",)),
    },
    exam=("abdomen soft and non-tender", "normoactive bowel sounds, no rebound or guarding",
          "no hepatosplenomegaly"),
    dxs=(
        _dx("Bleeding gastric ulcer", "K25.4", "black stools",
            "{n:2-5} episodes of coffee-ground emesis and black stools since yesterday",
            {"hgb": "L", "bun": "H", "hr": "H"}, "CT abdomen and pelvis with contrast",
            "Thickened gastric antral wall without active extravasation. No free air.",
            "Gastric wall thickening; no active bleeding source on CT.",
            "Endoscopy found a {n:8-20} mm antral ulcer with a visible vessel, treated with clips; "
            "{n:2-3} units of red cells transfused.",
            ("pantoprazole",),
            ("Pantoprazole 40 mg BID for 8 weeks.", "H. pylori biopsy result to follow.",
             "Repeat endoscopy in 8 weeks."),
            exam="epigastric tenderness, melena on rectal exam"),
        _dx("Acute gallstone pancreatitis", "K85.10", "epigastric pain",
            "severe epigastric pain radiating to the back with vomiting for {n:2-3} days",
            {"lipase": "H", "alt": "H", "wbc": "H"}, "Right upper quadrant ultrasound",
            "Multiple gallstones without wall thickening. Common bile duct {n:4-9} mm.",
            "Cholelithiasis; supports gallstone pancreatitis.",
            "IV fluids, analgesia and early oral feeding; cholecystectomy during the same admission.",
            ("ondansetron", "hydromorphone"),
            ("Low-fat diet for 2 weeks.", "No alcohol.", "Surgical follow-up after cholecystectomy."),
            exam="epigastric tenderness with voluntary guarding"),
        _dx("Alcohol-related cirrhosis with ascites", "K70.31", "abdominal swelling",
            "increasing abdominal girth and confusion over {n:2-3} weeks",
            {"bili": "H", "alb": "L", "inr": "H", "plt": "L", "na": "L"}, "Abdominal ultrasound with Doppler",
            "Nodular liver contour, spleen {f:13.5-17.0} cm, moderate ascites. Patent portal vein.",
            "Cirrhosis with portal hypertension and ascites.",
            "Paracentesis negative for SBP; {n:4-8} L removed with albumin. Lactulose titrated for encephalopathy.",
            ("spironolactone", "furosemide", "lactulose", "rifaximin"),
            ("Sodium restriction to 2 g a day.", "Liver transplant evaluation referral.",
             "Screening endoscopy for varices."),
            exam="distended abdomen with shifting dullness, scleral icterus, asterixis"),
        _dx("Crohn disease flare", "K50.011", "diarrhea",
            "{n:6-12} loose stools a day with cramping abdominal pain for {n:2-3} weeks",
            {"crp": "H", "hgb": "L", "alb": "L"}, "MR enterography",
            "Wall thickening and hyperenhancement of the terminal ileum over {n:8-25} cm; no abscess or fistula.",
            "Active terminal ileal Crohn disease.",
            "Stool infection studies negative; IV steroids started and infliximab induction planned.",
            ("prednisone", "infliximab"),
            ("Infliximab at weeks 0, 2 and 6.", "Steroid taper over 8 weeks.", "Fecal calprotectin in 3 months."),
            exam="right lower quadrant tenderness without peritonism"),
        _dx("Acute calculous cholecystitis", "K80.00", "right upper quadrant pain",
            "right upper quadrant pain after fatty meals for {n:2-3} days with fever",
            {"wbc": "H", "alp": "H", "temp": "H"}, "Right upper quadrant ultrasound",
            "Distended gallbladder, wall {n:4-8} mm, pericholecystic fluid and a stone impacted in the neck.",
            "Acute calculous cholecystitis.",
            "IV antibiotics; laparoscopic cholecystectomy on hospital day {n:1-3}.",
            ("ceftriaxone", "ondansetron"),
            ("No lifting over 5 kg for 2 weeks.", "Surgical clinic follow-up.", "Advance diet as tolerated."),
            exam="right upper quadrant tenderness with a positive Murphy sign"),
        _dx("Iron deficiency anemia", "D50.0", "fatigue",
            "fatigue and exertional breathlessness for {n:2-6} months", {"hgb": "L", "ferritin": "L"},
            None, "", "",
            "Colonoscopy found a {n:8-25} mm ascending colon polyp, removed by snare; IV iron given.",
            ("iron", "peg"),
            ("Oral iron every other day.", "Repeat hemoglobin in 4 weeks.", "Surveillance colonoscopy in 3 years."),
            exam="conjunctival pallor, abdomen soft"),
    ),
)

ENDOCRINOLOGY = Specialty(
    name="endocrinology", clinic="Endocrinology", ages=(19, 86),
    history=("obesity", "hypertension", "hyperlipidemia", "coronary artery disease", "chronic kidney disease "
             "stage 3a", "depression", "obstructive sleep apnea"),
    labs=("glu", "a1c", "na", "k", "cr", "tsh", "ft4", "ldl", "ca"),
    meds={
        "metformin": Med("metformin", ("500 mg", "1000 mg"), "PO", ("BID with meals",)),
        "glargine": Med("insulin glargine", ("{n:10-40} units",), "SC", ("nightly",)),
        "lispro": Med("insulin lispro", ("per sliding scale",), "SC", ("with meals",)),
        "empagliflozin": Med("empagliflozin", ("10 mg", "25 mg"), "PO", ("daily",)),
        "semaglutide": Med("semaglutide", ("0.25 mg", "0.5 mg", "1 mg"), "SC", ("weekly",)),
        "levothyroxine": Med("levothyroxine", ("25 mcg", "50 mcg", "75 mcg", "100 mcg"), "PO",
                             ("daily before breakfast",)),
        "methimazole": Med("methimazole", ("5 mg", "10 mg", "20 mg"), "PO", ("daily",)),
        "propranolol": Med("propranolol", ("10 mg", "20 mg"), "PO", ("TID",)),
        "alendronate": Med("alendronate", ("70 mg",), "PO", ("weekly",)),
        "vitd": Med("cholecalciferol", ("2000 units",), "PO", ("daily",)),
        "atorvastatin": Med("atorvastatin", ("20 mg", "40 mg"), "PO", ("nightly",)),
    },
    exam=("BMI {f:27.0-41.5} kg/m2", "no proptosis or lid lag", "thyroid not enlarged"),
    dxs=(
        _dx("Type 2 diabetes with hyperglycemia", "E11.65", "high blood sugars",
            "polyuria and blurred vision with home glucose readings over 300 for {n:2-6} weeks",
            {"glu": "H", "a1c": "H"}, None, "", "",
            "HbA1c {f:9.1-13.2}%; basal insulin started and diabetes education completed.",
            ("metformin", "glargine", "empagliflozin", "semaglutide"),
            ("Raise glargine by 2 units every 3 days to a fasting glucose of 80-130 mg/dL.",
             "Annual dilated eye exam.", "Foot care education and podiatry referral."),
            exam="reduced monofilament sensation in both feet"),
        _dx("Diabetic ketoacidosis", "E10.10", "vomiting",
            "nausea, abdominal pain and deep rapid breathing for {n:2-3} days",
            {"glu": "H", "hco3": "L", "k": "H", "ph": "L"}, "Chest X-ray, portable AP",
            "Lungs clear. No acute process.", "Normal chest radiograph.",
            "Anion gap {n:22-32}; insulin infusion and fluids per DKA protocol, gap closed after {n:12-30} hours.",
            ("glargine", "lispro"),
            ("Sick-day rules and ketone testing reviewed.", "Diabetes educator visit before discharge.",
             "Endocrinology follow-up in 2 weeks."),
            exam="Kussmaul breathing, dry mucous membranes"),
        _dx("Graves disease", "E05.00", "palpitations",
            "palpitations, heat intolerance and {n:3-9} kg weight loss over {n:2-4} months",
            {"tsh": "L", "ft4": "H", "hr": "H"}, "Thyroid ultrasound",
            "Diffusely enlarged hypervascular thyroid gland without discrete nodules.",
            "Findings consistent with Graves disease.",
            "Thyroid-stimulating immunoglobulin elevated; methimazole and propranolol started.",
            ("methimazole", "propranolol"),
            ("Thyroid function tests in 4 to 6 weeks.", "CBC and liver tests if fever or sore throat.",
             "Discuss radioiodine if it relapses."),
            exam="diffuse non-tender goiter, fine tremor and lid lag"),
        _dx("Primary hypothyroidism", "E03.9", "fatigue",
            "fatigue, cold intolerance and constipation for {n:2-6} months", {"tsh": "H", "ft4": "L", "ldl": "H"},
            None, "", "", "TSH {f:8.5-45.0} mIU/L; levothyroxine started at a weight-based dose.",
            ("levothyroxine",),
            ("Take levothyroxine on an empty stomach, apart from calcium and iron.", "TSH in 6 weeks.",
             "Adjust the dose by 12.5 to 25 mcg as needed."),
            exam="dry skin, delayed relaxation of the ankle reflexes"),
        _dx("Thyroid nodule", "E04.1", "neck lump",
            "a neck lump found on a routine exam {n:2-8} weeks ago", {}, "Thyroid ultrasound",
            "Solid hypoechoic {side} lobe nodule measuring {f:1.0-3.5} cm with microcalcifications, TI-RADS 5.",
            "Suspicious thyroid nodule; fine-needle aspiration recommended.",
            "Fine-needle aspiration performed; cytology Bethesda {c:III|IV|V}.",
            (),
            ("Surgical referral for hemithyroidectomy.", "Molecular testing of the aspirate.",
             "Repeat ultrasound in 12 months if benign."),
            exam="firm {side} thyroid nodule, no cervical lymphadenopathy"),
        _dx("Osteoporosis with fragility fracture", "M80.08XA", "fracture pain",
            "a low-trauma {c:wrist|vertebral|hip} fracture {n:2-10} weeks ago", {"vitd": "L"}, "DXA scan",
            "Lumbar spine T-score -{f:2.5-3.8}; femoral neck T-score -{f:2.5-3.4}.", "Osteoporosis.",
            "Secondary causes excluded; alendronate started with calcium and vitamin D.",
            ("alendronate", "vitd"),
            ("Repeat DXA in 2 years.", "Fall prevention and weight-bearing exercise.",
             "Dental review before long-term therapy."), ages=(50, 90),
            exam="thoracic kyphosis, height loss of {n:3-6} cm"),
    ),
    note_bias={"lab": 1.8, "radiology": 0.6},
)

SPECIALTIES: dict[str, Specialty] = {s.name: s for s in (
    CARDIOLOGY, ONCOLOGY, PEDIATRICS, NEUROLOGY, PULMONOLOGY, GASTROENTEROLOGY, ENDOCRINOLOGY)}

NOTE_TYPES: dict[str, float] = {
    "admission": 0.16, "discharge": 0.16, "progress": 0.18, "lab": 0.14,
    "radiology": 0.12, "medication_list": 0.10, "referral": 0.14,
}

ALLERGIES = ("No known drug allergies.", "No known drug allergies.", "Penicillin (rash).", "Sulfa drugs (hives).",
             "Iodinated contrast (anaphylaxis).", "Codeine (nausea).", "Latex.")
GENERAL = ("alert, in no acute distress", "appears uncomfortable", "tired but conversant", "well appearing",
           "anxious, speaking in full sentences")
SUBJECTIVE = ("Feels better today; {symptom} improving.", "Slept poorly overnight with ongoing {symptom}.",
              "No new complaints; eating and walking.", "Reports {symptom} is about the same as yesterday.",
              "Much improved, asking about going home.")
TRENDS = ("improving", "stable", "slowly improving", "not yet at baseline", "clinically improving on treatment")
FOLLOW_UPS = ("Follow-up in {clinic} clinic with Dr. {consultant} on {followup_date}.",
              "Clinic review on {followup_date}.", "Return precautions reviewed with {ref}.")
REQUESTS = ("your opinion on further management", "specialist assessment and a treatment plan",
            "review in clinic at your earliest convenience")

_PROPER = ("Graves", "Parkinson", "Alzheimer", "Crohn")


# --------------------------------------------------------------------------------------------------
# Note templates: per type, one variant per house style
# --------------------------------------------------------------------------------------------------

TEMPLATES: dict[str, tuple[str, ...]] = {
    "admission": (
        "ADMISSION NOTE\n{hospital}\n"
        "Patient: {name} | MRN: {mrn} | DOB: {dob}\n"
        "Admitted: {admit_date} | Attending: Dr. {doctor}\n{guardian_line}"
        "HPI: {a_age} {sex_word} with {pmh} presenting with {complaint}.\n"
        "VITALS: {vitals}\nLABS: {labs_inline}.\n"
        "ASSESSMENT: {dx} ({icd10}).\nPLAN: {plan_inline}",

        "HISTORY AND PHYSICAL - {hospital}\nDate of admission: {admit_date}\n"
        "Name: {name} | DOB: {dob} | MRN: {mrn}\nAddress: {address} | Phone: {phone}\n{guardian_line}"
        "History: {ref} is {a_age} {sex_word} who presents with {complaint}. Past history: {pmh}.\n"
        "Examination: {exam_cap}.\n"
        "Impression: {dx} ({icd10}).\nPlan:\n{plan_list}\nDr. {doctor}, {clinic}",
    ),
    "discharge": (
        "DISCHARGE SUMMARY\n{hospital}\nPatient: {name} | DOB: {dob} | MRN: {mrn}\n"
        "Admitted: {admit_date} | Discharged: {discharge_date}\n"
        "PRINCIPAL DIAGNOSIS: {dx} ({icd10})\n"
        "HOSPITAL COURSE: {ref}, {age_str}, was admitted with {complaint}. {course}\n"
        "DISCHARGE MEDICATIONS:\n{med_list}\n"
        "FOLLOW-UP: {clinic} clinic with Dr. {consultant} on {followup_date}.\nDictated by Dr. {doctor}",

        "{hospital} | Discharge Summary\n{name}, MRN {mrn}, DOB {dob}\n"
        "Admission {admit_date} to {discharge_date}\nDiagnosis: {dx} ({icd10})\n"
        "Summary: {course} {Pronoun} was discharged home in stable condition.\n"
        "Medications on discharge: {meds_inline}.\nInstructions: {plan_inline}\n"
        "Follow-up: Dr. {consultant}, {followup_date}.\nAttending: Dr. {doctor}",
    ),
    "progress": (
        "PROGRESS NOTE - {date}\n{hospital}, {clinic}\n"
        "Patient: {name} | MRN: {mrn} | Hospital day {hday}\n"
        "S: {subjective}\nO: {vitals}. {exam_cap}. {labs_inline}.\n"
        "A: {dx}, {trend}.\nP: {plan_inline}\nDr. {doctor}",

        "Daily progress note for {name} (MRN {mrn}) - {date}\n"
        "Hospital day {hday} for {dx_lc}. {subjective}\n"
        "Exam: {exam_cap}.\nLabs today: {labs_inline}.\n"
        "Assessment: {trend_cap}.\nPlan:\n{plan_list}\nDr. {doctor}",
    ),
    "lab": (
        "LABORATORY REPORT\n{hospital} Clinical Laboratory\n"
        "Patient: {name} | MRN: {mrn} | DOB: {dob}\n"
        "Collected: {collected} | Ordered by: Dr. {doctor}\n"
        "Clinical notes: {symptom}\n{labs_block}\nComment: {lab_comment}",

        "LAB RESULTS - {clinic}\n{name} (MRN {mrn}), DOB {dob}\n"
        "Specimen collected {collected}\n{labs_block}\nReviewed by Dr. {doctor}: {lab_comment}",
    ),
    "radiology": (
        "RADIOLOGY REPORT\n{hospital} Department of Radiology\n"
        "Patient: {name} | MRN: {mrn} | DOB: {dob}\n"
        "Exam: {study} | Date: {date}\nReferring physician: Dr. {doctor}\n"
        "INDICATION: {indication}.\nCOMPARISON: {comparison}\n"
        "FINDINGS: {finding}\nIMPRESSION: {impression}\nElectronically signed by Dr. {radiologist}",

        "{study} - {date}\n{hospital} Imaging\n{name} | MRN {mrn} | DOB {dob}\n"
        "Clinical history: {indication}. Requested by Dr. {doctor}.\n"
        "Findings: {finding}\nImpression: {impression}\nReported by Dr. {radiologist}",
    ),
    "medication_list": (
        "MEDICATION RECONCILIATION\n{hospital} Pharmacy\n"
        "Patient: {name} | DOB: {dob} | MRN: {mrn}\n"
        "Reconciled on {date} by Dr. {doctor}\nAllergies: {allergies}\n"
        "Active medications:\n{med_list}\nIndication: {dx} ({icd10}).",

        "Medication list for {name} (DOB {dob}, MRN {mrn})\n{hospital}, {date}\n{med_list}\n"
        "Allergies: {allergies}\nPrescriber: Dr. {doctor}. Pharmacy questions: {hospital_phone}.",
    ),
    "referral": (
        "{hospital}\n{hospital_address} | Tel {hospital_phone}\n{date}\n\n"
        "Dear Dr. {consultant},\n\nRe: {name}, DOB {dob}, MRN {mrn}\n{address}\n\n"
        "I would be grateful for {request} for this {age_str} {sex_word} with {dx_lc}. "
        "{Pronoun} presented with {complaint}. {labs_sentence} {contact}\n\n"
        "Kind regards,\nDr. {doctor}, {clinic}",

        "REFERRAL - {clinic}\nTo: Dr. {consultant}\nFrom: Dr. {doctor}, {hospital} ({email})\nDate: {date}\n"
        "Patient: {name}, DOB {dob}, MRN {mrn}, phone {phone}\n"
        "Reason: {dx} ({icd10}).\nBackground: {pmh_cap}. {Pronoun} presented with {complaint}.\n"
        "Requested: {request}.",
    ),
}


# --------------------------------------------------------------------------------------------------
# Choosing and composing a note
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    age_years: int
    age_months: int  # total months; only worded for children under 2
    sex: str         # "F" | "M"


def choose_note_type(specialty: str, rng: random.Random) -> str:
    bias = SPECIALTIES[specialty].note_bias
    kinds = list(NOTE_TYPES)
    return rng.choices(kinds, weights=[NOTE_TYPES[k] * bias.get(k, 1.0) for k in kinds])[0]


def choose_dx(specialty: str, note_type: str, rng: random.Random) -> Dx:
    dxs = SPECIALTIES[specialty].dxs
    if note_type == "radiology":
        dxs = tuple(d for d in dxs if d.study)  # a radiology report needs a study to report on
    return rng.choice(dxs)


def choose_patient(specialty: str, dx: Dx, rng: random.Random) -> Patient:
    lo, hi = dx.ages or SPECIALTIES[specialty].ages
    months = rng.randint(lo * 12, hi * 12 + 11)
    if lo == 0:
        months = max(months, 1)
    return Patient(months // 12, months, dx.sex or rng.choice("FM"))


def _age_str(p: Patient) -> str:
    return f"{p.age_months}-month-old" if p.age_years < 2 else f"{p.age_years}-year-old"


def _article(word: str) -> str:
    # "an" before a spoken vowel: 8, 11, 18, 80-89 ("an 8-month-old", "an 81-year-old")
    number = word.split("-", 1)[0]
    return "an" if number.startswith("8") or number in ("11", "18") else "a"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    first = text.split(" ", 1)[0]
    if first.isupper() or first in _PROPER or (len(first) > 1 and first[1].isupper()):
        return text
    return text[:1].lower() + text[1:]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _lab_value(lab: Lab, flag: str, rng: random.Random, mild: bool = False) -> float:
    """A value in the reference range, or outside it by 10-100% (mild: 2-25%) of the way to the span's edge."""
    lo, hi = lab.ref
    near, far = (0.02, 0.25) if mild else (0.1, 1.0)
    if flag == "H":
        return hi + (lab.span[1] - hi) * rng.uniform(near, far)
    if flag == "L":
        return lo - (lo - lab.span[0]) * rng.uniform(near, far)
    return rng.uniform(lo, hi)


def _labs(spec: Specialty, dx: Dx, rng: random.Random) -> list[tuple[Lab, str, str]]:
    """(lab, printed value, flag) for the diagnosis' labs first, then a few of the routine panel."""
    keys = [k for k in dx.hints if k in LABS]
    keys += rng.sample([k for k in spec.labs if k not in keys], k=rng.randint(2, 3))
    keys = keys[:4]  # digits cost a token each: a short panel keeps the note under ~200 tokens
    out = []
    for key in keys:
        lab = LABS[key]
        flag = dx.hints.get(key, "")
        mild = False
        if not flag and rng.random() < 0.12:  # the odd incidental, mildly abnormal value
            flag = rng.choice([f for f, ok in (("H", lab.span[1] > lab.ref[1]), ("L", lab.span[0] < lab.ref[0]))
                               if ok])
            mild = True
        value = lab.fmt(_lab_value(lab, flag, rng, mild))
        # Rounding can land a drawn value on the range edge; the printed flag follows the printed number.
        num = float(value)
        flag = "H" if num > lab.ref[1] else "L" if num < lab.ref[0] else ""
        out.append((lab, value, flag))
    return out


def _lab_line(lab: Lab, value: str, flag: str) -> str:
    unit = f" {lab.unit}" if lab.unit else ""
    mark = f" {flag}" if flag else ""
    return f"{lab.name}: {value}{unit}{mark} (ref {lab.fmt(lab.ref[0])}-{lab.fmt(lab.ref[1])})"


def _lab_inline(lab: Lab, value: str, flag: str) -> str:
    unit = f" {lab.unit}" if lab.unit else ""
    return f"{lab.name} {value}{unit}" + (f" ({flag})" if flag else "")


def _lab_comment(labs: Sequence[tuple[Lab, str, str]]) -> str:
    abnormal = [f"{lab.name} {'high' if flag == 'H' else 'low'}" for lab, _, flag in labs if flag]
    if not abnormal:
        return "All results within reference ranges."
    return f"Abnormal: {', '.join(abnormal)}."


def _vitals(p: Patient, hints: Mapping[str, str], rng: random.Random) -> str:
    def pick(key: str, normal: tuple[float, float], high: tuple[float, float], low: tuple[float, float]) -> float:
        flag = hints.get(key, "")
        return rng.uniform(*(high if flag == "H" else low if flag == "L" else normal))

    if p.age_years < 2:
        hr_n, rr_n, sys_n = (100, 160), (28, 45), (80, 100)
    elif p.age_years < 12:
        hr_n, rr_n, sys_n = (75, 125), (18, 30), (90, 112)
    else:
        hr_n, rr_n, sys_n = (58, 99), (12, 20), (104, 138)
    hr = pick("hr", hr_n, (hr_n[1] + 8, hr_n[1] + 50), hr_n)
    rr = pick("rr", rr_n, (rr_n[1] + 4, rr_n[1] + 16), rr_n)
    sys_bp = pick("bp", sys_n, (172, 218), (78, 92))
    dia_bp = sys_bp * rng.uniform(0.55, 0.68)
    temp = pick("temp", (36.3, 37.4), (38.1, 39.8), (35.4, 36.0))
    spo2 = pick("spo2", (95, 99.4), (95, 99.4), (84, 92.4))
    text = f"BP {sys_bp:.0f}/{dia_bp:.0f} mmHg, HR {hr:.0f}, RR {rr:.0f}, T {temp:.1f} °C, SpO2 {spo2:.0f}%"
    text += " on room air" if spo2 >= 93 or rng.random() < 0.5 else f" on {rng.randint(2, 4)} L nasal cannula"
    if p.age_years < 18:  # children are dosed per kilogram, so their notes carry a weight
        if p.age_years < 1:
            kg = 3.5 + 0.55 * p.age_months + rng.uniform(-0.6, 0.6)
        elif p.age_years < 12:
            kg = 8 + 2.3 * p.age_years + rng.uniform(-1.5, 1.5)
        else:
            kg = 35 + 5 * (p.age_years - 12) + rng.uniform(-5, 8)
        text += f", Wt {kg:.1f} kg"
    return text


def _med(m: Med, rng: random.Random, brief: bool = False) -> str:
    dose, freq = rng.choice(m.doses), rng.choice(m.freqs)
    return f"{m.drug} {dose} {freq}" if brief else f"{m.drug} {dose} {m.route} {freq}"


def compose(note_type: str, specialty: str, dx: Dx, patient: Patient, pii: Mapping[str, tuple[str, str]],
            facts: Mapping[str, str], rng: random.Random, style: int) -> tuple[str, list[Span]]:
    """Render one note; pii holds every PII field a template may name (see data.py), facts los and hday."""
    spec = SPECIALTIES[specialty]
    variants = TEMPLATES[note_type]
    # A hospital mostly writes in its own house style: one more non-IID signal across hospitals.
    variant = style % len(variants) if rng.random() < 0.8 else rng.randrange(len(variants))
    template = variants[variant]

    child = patient.age_years < 18
    female = patient.sex == "F"
    pronoun = "she" if female else "he"
    possessive = "her" if female else "his"
    age = _age_str(patient)

    labs = _labs(spec, dx, rng)
    keys = list(dx.meds) or rng.sample(list(spec.meds), k=2)
    extra = [k for k in spec.meds if k not in keys]
    if extra and rng.random() < 0.4:
        keys.append(rng.choice(extra))
    meds = [spec.meds[k] for k in keys[:5 if note_type == "medication_list" else 3]]
    plan = rng.sample(dx.plan, k=2)
    if rng.random() < 0.5:
        plan.append(rng.choice(FOLLOW_UPS))
    history = [rng.choice(spec.history)] if child else rng.sample(spec.history, k=rng.randint(1, 2))
    shown = dx.exam if dx.exam and rng.random() < 0.85 else rng.choice(spec.exam)
    exam = f"{rng.choice(GENERAL)}; {shown}"
    side = rng.choice(("left", "right"))

    values: dict[str, str] = {
        **facts,
        "clinic": spec.clinic,
        "age_str": age,
        "a_age": f"{_article(age)} {age}",
        "sex_word": ("girl" if female else "boy") if child else ("woman" if female else "man"),
        "pronoun": pronoun, "Pronoun": _cap(pronoun), "possessive": possessive,
        "title": "Ms." if female else "Mr.",
        "ref": "{first}" if child else "{title} {surname}",
        "side": side,
        "other_side": "right" if side == "left" else "left",  # a stroke's weakness is opposite its lesion
        "guardian_line": "Parent/guardian: {guardian}, tel {phone}\n" if child else "",
        "contact": ("{Pronoun} lives with {possessive} parent {guardian}, who can be reached on {phone}." if child
                    else "{Pronoun} can be reached on {phone}."),
        "symptom": dx.symptom, "symptom_cap": _cap(dx.symptom),
        "complaint": dx.complaint,
        "pmh": _join(history), "pmh_cap": _cap(_join(history)),
        "allergies": rng.choice(ALLERGIES),
        "vitals": _vitals(patient, dx.hints, rng),
        "exam": exam, "exam_cap": _cap(exam),
        "labs_inline": ", ".join(_lab_inline(*lab) for lab in labs[:2]),
        "labs_block": "\n".join(_lab_line(*lab) for lab in labs),
        "lab_comment": _lab_comment(labs),
        "labs_sentence": "Recent results: " + ", ".join(_lab_inline(*lab) for lab in labs[:2]) + ".",
        "dx": dx.name, "dx_lc": _lower_first(dx.name), "icd10": dx.icd10,
        "study": dx.study or "", "finding": dx.finding, "impression": dx.impression,
        "indication": f"{_cap(dx.symptom)}, {age} {'F' if female else 'M'}",
        "comparison": "Prior study of {prior_date}." if rng.random() < 0.4 else "None available.",
        "course": dx.course,
        "med_list": "\n".join(f"{i}. {_med(m, rng)}" for i, m in enumerate(meds, 1)),
        "meds_inline": ", ".join(_med(m, rng, brief=True) for m in meds[:3]),
        "plan_inline": " ".join(plan),
        "plan_list": "\n".join(f"- {p}" for p in plan),
        "subjective": rng.choice(SUBJECTIVE),
        "trend": (trend := rng.choice(TRENDS)), "trend_cap": _cap(trend),
        "request": rng.choice(REQUESTS),
    }
    return render(template, values, pii, rng)
