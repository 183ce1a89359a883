"""Report text de-identification: deny list from the DICOM header plus rules; dates shifted, not removed.

Rules (backend "rules"), applied to the original text; overlapping hits resolve by priority, then length:

1. e-mail addresses -> ``[EMAIL]``; URLs -> ``[URL]``.
2. Deny-list values (from `deny_list_from_dataset` or the caller): case-insensitive, bounded by
   non-alphanumerics, any run of whitespace/commas between words; names also as "John Smith",
   "Smith, John", "J. Smith", "Smith J", "John A. Smith" and single name parts of >= 2 letters.
   -> ``[NAME]``, ``[ID]``, ``[ACCESSION]``, ``[INSTITUTION]``, ``[ADDRESS]``.
   Identifiers after a label (MRN, ID, Acc/Accession, No.) -> ``[ID]`` / ``[ACCESSION]``.
3. Dates are shifted by `date_offset_days` and written back in the format they were written in
   (03/14/2024, 3/14/24, 2024-03-14, 14.03.2024, 20240314, March 14, 2024, 14 Mar 2024, 14-MAR-2024),
   so intervals between dates stay true. Slash dates are month first unless the first number is
   > 12. Partial dates (March 2024, 03/2024) are shifted at month resolution: the middle of the
   month is shifted and its month/year written. A year alone is kept. A date from the deny list in a
   form these patterns miss -> ``[DATE]``. Times of day are kept.
4. Phone and fax numbers -> ``[PHONE]``; street addresses (number + capitalised words + street
   word, optional ", City, ST 12345"), ZIP codes after a state code, PO boxes -> ``[ADDRESS]``.
5. Staff names after titles and phrases (Dr./Doctor, "..., MD", "discussed with", "dictated by",
   "reviewed by", "electronically signed by", "Patient:", ...) -> ``[NAME]``; institution names
   ("... Hospital", "... Medical Center", "... Clinic") -> ``[INSTITUTION]``.
6. Digit runs of >= 6 and codes with >= 6 digits -> ``[ID]``; ages over 89 -> "90+"
   ("93-year-old" -> "90+-year-old").

Clinical content (measurements, lobes, laterality, negations) is not matched by any rule; name
parts that are also clinical words (see `_CLINICAL_WORDS`) are matched only inside full names.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset

from appliance.errors import ConfigError

TAGS = {"name": "[NAME]", "id": "[ID]", "accession": "[ACCESSION]", "phone": "[PHONE]", "email": "[EMAIL]",
        "url": "[URL]", "address": "[ADDRESS]", "institution": "[INSTITUTION]", "date": "[DATE]", "age": "90+"}


@dataclass
class ReportScrubResult:
    """Scrubbed text and what was replaced: {"category", "start", "length"} in the original text, no values."""

    text: str
    replacements: list[dict] = field(default_factory=list)


class DenyList(set):
    """A set of identifying strings that also remembers each one's category (name, id, date, ...)."""

    def __init__(self, items: Iterable[str] = ()):
        super().__init__()
        self.categories: dict[str, str] = {}
        for item in items:
            self.add(item)

    def add(self, value: str, category: str | None = None) -> None:  # type: ignore[override]
        value = " ".join(str(value).split())
        if len(value) < 2:
            return
        super().add(value)
        if category is not None:
            self.categories.setdefault(value, category)


# ---------------------------------------------------------------------------------------------
# Deny list from a DICOM header

_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                  "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
                  "ScheduledPerformingPhysicianName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                  "ResponsiblePerson", "ReviewerName", "VerifyingObserverName", "PersonName")
_ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "IssuerOfPatientID", "StudyID", "RequestedProcedureID",
                "ScheduledProcedureStepID", "PerformedProcedureStepID", "DeviceSerialNumber", "StationName",
                "AdmissionID", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence", "RequestAttributesSequence")
_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate",
                  "PerformedProcedureStepStartDate", "ScheduledProcedureStepStartDate", "InstanceCreationDate")
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
# name parts that are also report vocabulary: matched only as part of a full name
_CLINICAL_WORDS = frozenset([
    "right", "left", "upper", "lower", "middle", "lobe", "lobes", "mass", "small", "large", "normal",
    "clear", "mild", "moderate", "severe", "chest", "lung", "lungs", "heart", "base", "bases", "apex", "no",
    "yes", "and", "or", "the", "with", "without", "of", "in", "on", "at", "to", "for", "by", "as", "is",
    "are", "will", "new", "stable", "see", "patient", "doctor", "wall", "bile", "soft", "tissue", "air",
    "fluid", "fat", "bone"
])


def _pn_parts(value) -> tuple[str, str, str]:
    pn = value if isinstance(value, pydicom.valuerep.PersonName) else pydicom.valuerep.PersonName(str(value))
    return (str(pn.family_name or "").strip(), str(pn.given_name or "").strip(), str(pn.middle_name or "").strip())


def name_variants(family: str, given: str = "", middle: str = "") -> list[str]:
    """The ways a person's name is written in reports (full forms, initials, parts)."""
    out: list[str] = []
    f, g, m = (" ".join(s.split()) for s in (family, given, middle))
    if f and g:
        gi = g[0]
        out += [f"{g} {f}", f"{f}, {g}", f"{f} {g}", f"{gi}. {f}", f"{gi} {f}", f"{f}, {gi}.", f"{f} {gi}.", f"{f} {gi}",
                f"{f}, {gi}", f"{f}^{g}"]
        if m:
            mi = m[0]
            out += [f"{g} {m} {f}", f"{g} {mi}. {f}", f"{g} {mi} {f}", f"{f}, {g} {m}", f"{f}, {g} {mi}.",
                    f"{f}, {g} {mi}", f"{gi}. {mi}. {f}", f"{gi}.{mi}. {f}", f"{f}^{g}^{m}"]
    for part in (f, g, m):
        for piece in re.split(r"[\s-]+", part):
            if len(piece) >= 2:
                out.append(piece)
    return out


def _date_forms(value: str) -> list[str]:
    """A DICOM DA (YYYYMMDD) written the common ways."""
    try:
        d = dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return []
    month = _MONTHS[d.month - 1]
    return [d.strftime("%Y%m%d"), d.strftime("%m/%d/%Y"), f"{d.month}/{d.day}/{d.year}", d.strftime("%d.%m.%Y"),
            d.isoformat(), d.strftime("%d/%m/%Y"), f"{month} {d.day}, {d.year}", f"{month[:3]} {d.day}, {d.year}",
            f"{d.day} {month} {d.year}", f"{d.day:02d}-{month[:3].upper()}-{d.year}", d.strftime("%m/%d/%y")]


def _walk(ds: Dataset):
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk(item)
        else:
            yield elem


def _values(elem) -> list[str]:
    v = elem.value
    if v is None or isinstance(v, (bytes, bytearray)):
        return []
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return [str(x) for x in v if str(x).strip()]
    return [str(v)] if str(v).strip() else []


def deny_list_from_dataset(ds: Dataset) -> DenyList:
    """Identifying strings of a DICOM header (names and their variants, IDs, institution, address, dates)."""
    deny = DenyList()
    for elem in _walk(ds):
        kw = elem.keyword or ""
        if elem.VR == "PN" or kw in _NAME_KEYWORDS:
            for value in _values(elem):
                for v in name_variants(*_pn_parts(value)):
                    deny.add(v, "name")
        elif kw == "AccessionNumber":
            for value in _values(elem):
                deny.add(value, "accession")
        elif kw in _ID_KEYWORDS or kw.endswith("PatientID") or kw == "PatientID":
            for value in _values(elem):
                if len(value.strip()) >= 3:
                    deny.add(value, "id")
        elif kw == "InstitutionName" or kw == "InstitutionalDepartmentName":
            for value in _values(elem):
                deny.add(value, "institution")
        elif kw == "InstitutionAddress" or kw.endswith("Address"):
            for value in _values(elem):
                deny.add(value, "address")
                for part in (p.strip() for p in value.split(",")):
                    if len(part) >= 4 and part.lower() not in _CLINICAL_WORDS:
                        deny.add(part, "address")
        elif elem.VR == "DA" or kw in _DATE_KEYWORDS:
            for value in _values(elem):
                for form in _date_forms(value):
                    deny.add(form, "date")
    return deny


# ---------------------------------------------------------------------------------------------
# Dates

_MONTH_RE = (r"(?P<mon>Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
             r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_B = r"(?<![0-9A-Za-z])"
_E = r"(?![0-9A-Za-z])"
_DATE_PATTERNS = [
    ("ymd", re.compile(_B + r"(?P<y>(?:19|20)\d\d)(?P<s>[-/.])(?P<m>\d{1,2})(?P=s)(?P<d>\d{1,2})" + _E)),
    ("mdy", re.compile(_B + r"(?P<m>\d{1,2})(?P<s>[/-])(?P<d>\d{1,2})(?P=s)(?P<y>(?:19|20)?\d\d)" + r"(?![0-9A-Za-z/])")),
    ("dmy_dot", re.compile(_B + r"(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>(?:19|20)\d\d)" + _E)),
    ("compact", re.compile(_B + r"(?P<y>(?:19|20)\d\d)(?P<m>[01]\d)(?P<d>[0-3]\d)" + _E)),
    ("mon_d_y", re.compile(_B + _MONTH_RE + r"(?P<dot>\.?)\s+(?P<d>\d{1,2})(?P<ord>st|nd|rd|th)?(?P<comma>,?)\s+(?P<y>(?:19|20)\d\d)" + _E, re.IGNORECASE)),
    ("d_mon_y", re.compile(_B + r"(?P<d>\d{1,2})(?P<ord>st|nd|rd|th)?(?P<s1>[\s-]+)(?:of\s+)?" + _MONTH_RE + r"(?P<dot>\.?)(?P<s2>[\s,-]+)(?P<y>(?:19|20)\d\d)" + _E, re.IGNORECASE)),
    ("mon_y", re.compile(_B + _MONTH_RE + r"(?P<dot>\.?)(?P<s>,?\s+)(?P<y>(?:19|20)\d\d)" + _E, re.IGNORECASE)),
    ("m_y", re.compile(_B + r"(?P<m>0?[1-9]|1[0-2])/(?P<y>(?:19|20)\d\d)" + r"(?![0-9A-Za-z/])")),
]


def _month_number(name: str) -> int:
    return [m[:3].lower() for m in _MONTHS].index(name[:3].lower()) + 1


def _styled_month(original: str, month: int) -> str:
    full = _MONTHS[month - 1]
    if len(original) <= 3 or original.lower() not in [m.lower() for m in _MONTHS]:
        word = full[:4] if original.lower().startswith("sept") and month == 9 else full[:3]
    else:
        word = full
    if original.isupper():
        return word.upper()
    if original.islower():
        return word.lower()
    return word


def _pad(original: str, value: int) -> str:
    return f"{value:0{len(original)}d}" if len(original) > 1 else str(value)


def _ordinal(day: int) -> str:
    return "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _year(original: str, year: int) -> str:
    return f"{year % 100:02d}" if len(original) == 2 else str(year)


def _shift_date(kind: str, m: re.Match, offset: int, day_first: bool) -> str | None:
    """The match rewritten with its date moved by `offset` days, or None when it is not a real date."""
    g = m.groupdict()
    y_text = g["y"]
    year = int(y_text) if len(y_text) == 4 else (2000 + int(y_text) if int(y_text) < 50 else 1900 + int(y_text))
    if kind in ("mon_y", "m_y"):
        month = _month_number(g["mon"]) if kind == "mon_y" else int(g["m"])
        shifted = dt.date(year, month, 15) + dt.timedelta(days=offset)
        if kind == "m_y":
            return f"{_pad(g['m'], shifted.month)}/{shifted.year}"
        return f"{_styled_month(g['mon'], shifted.month)}{g['dot']}{g['s']}{shifted.year}"
    if kind in ("mon_d_y", "d_mon_y"):
        month, day = _month_number(g["mon"]), int(g["d"])
    else:
        month, day = int(g["m"]), int(g["d"])
        if kind == "mdy" and (day_first or month > 12) and day <= 12:
            month, day = day, month
    try:
        d = dt.date(year, month, day)
    except ValueError:
        return None
    s = d + dt.timedelta(days=offset)
    if kind == "ymd":
        return f"{s.year}{g['s']}{_pad(g['m'], s.month)}{g['s']}{_pad(g['d'], s.day)}"
    if kind == "compact":
        return s.strftime("%Y%m%d")
    if kind == "dmy_dot":
        return f"{_pad(g['d'], s.day)}.{_pad(g['m'], s.month)}.{s.year}"
    if kind == "mdy":
        swapped = int(g["m"]) != month
        first, second = (s.day, s.month) if swapped else (s.month, s.day)
        return f"{_pad(g['m'], first)}{g['s']}{_pad(g['d'], second)}{g['s']}{_year(y_text, s.year)}"
    ordinal = _ordinal(s.day) if g.get("ord") else ""
    if g.get("ord") and g["ord"].isupper():
        ordinal = ordinal.upper()
    mon = _styled_month(g["mon"], s.month) + g["dot"]
    if kind == "mon_d_y":
        return f"{mon} {_pad(g['d'], s.day)}{ordinal}{g['comma']} {s.year}"
    return f"{_pad(g['d'], s.day)}{ordinal}{g['s1']}{mon}{g['s2']}{s.year}"


# ---------------------------------------------------------------------------------------------
# Rules

_NAME_TOKEN = r"[A-Z][a-zA-Z'\-]+"
_NAME_SEQ = rf"{_NAME_TOKEN}(?:,?\s+(?:[A-Z]\.?\s+)?{_NAME_TOKEN})?(?:\s+{_NAME_TOKEN})?"
_RULES: list[tuple[str, int, re.Pattern, str | None]] = [
    # (category, priority, pattern, group holding the identifier or None for the whole match)
    ("email", 0, re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+"), None),
    ("url", 0, re.compile(r"(?:https?://|ftp://|www\.)[^\s<>\"')\]]+[^\s<>\"').,;:\]]", re.IGNORECASE), None),
    ("accession", 1, re.compile(r"(?i:\b(?:acc(?:ession)?\.?(?:\s*(?:no\.?|number|num|#))?)\s*[:#]?\s*)(?P<v>[A-Z0-9][A-Z0-9\-]{3,})\b"), "v"),
    ("id", 1, re.compile(r"(?i:\b(?:MRN|MR\s*#|medical\s+record(?:\s+number)?|patient\s+ID|pt\.?\s+ID|ID|NHS\s+(?:no\.?|number)|SSN|case\s+(?:no\.?|number))\s*[:#]?\s*(?:no\.?\s*)?)(?P<v>[A-Z0-9][A-Z0-9\-]{3,})\b"), "v"),
    ("phone", 3, re.compile(r"(?<![\w/.])(?:\+?1[\s.\-]?)?(?:\(\d{3}\)\s*|\d{3}[\s.\-])\d{3}[\s.\-]\d{4}(?:\s*(?:x|ext\.?)\s*\d{1,5})?(?![\w/])"), None),
    ("phone", 3, re.compile(r"(?<![\w/])\+\d{1,3}(?:[\s\-]?\(?\d{1,4}\)?){2,5}(?![\w/])"), None),
    ("phone", 3, re.compile(r"(?i:\b(?:tel|phone|fax|pager|pgr|cell|ext)\.?\s*[:#]?\s*)(?P<v>\+?[\d\-\s().]{4,}\d)"), "v"),
    ("address", 2, re.compile(
        r"\b\d{1,6}\s+(?:[A-Z][A-Za-z.'\-]*\s+){1,4}(?:Street|St|Avenue|Ave|Road|Rd|Way|Drive|Dr|Boulevard|Blvd|"
        r"Lane|Ln|Court|Ct|Place|Pl|Terrace|Parkway|Pkwy|Highway|Hwy|Circle|Square|Sq|Trail|Plaza)\b\.?"
        r"(?:,?\s+(?:Apt|Suite|Ste|Unit|#)\.?\s*[\w\-]+)?"
        r"(?:,\s*[A-Z][A-Za-z.'\-]*(?:\s+[A-Z][A-Za-z.'\-]*){0,2})?(?:,?\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?)?"), None),
    ("address", 2, re.compile(r"\b(?:P\.?\s?O\.?\s+Box|Post\s+Office\s+Box)\s+\d+\b", re.IGNORECASE), None),
    ("address", 2, re.compile(r"\b(?:A[KLRZ]|C[AOT]|D[CE]|FL|GA|HI|I[ADLN]|K[SY]|LA|M[ADEINOST]|N[CDEHJMVY]|O[HKR]|P[AR]|RI|"
                              r"S[CD]|T[NX]|UT|V[AIT]|W[AIVY])\s+\d{5}(?:-\d{4})?\b"), None),
    ("name", 5, re.compile(rf"\b(?:Dr\.?|Doctor|Drs\.?|Prof\.?|Mr\.?|Mrs\.?|Ms\.?|Miss)\s+(?P<v>{_NAME_SEQ})"), "v"),
    ("name", 5, re.compile(rf"(?P<v>{_NAME_TOKEN}(?:\s+[A-Z]\.?)?(?:\s+{_NAME_TOKEN}){{0,2}}),?\s+(?:M\.?D\.?|D\.?O\.?|Ph\.?D\.?|R\.?N\.?|PA-C|NP|FRCR|FRCPC)(?![A-Za-z])"), "v"),
    ("name", 5, re.compile(rf"(?i:\b(?:discussed\s+with|dictated\s+by|reviewed\s+by|read\s+by|signed\s+by|"
                           rf"electronically\s+signed\s+by|transcribed\s+by|verified\s+by|approved\s+by|attending|resident|"
                           rf"radiologist|technologist|referring\s+physician|ordering\s+physician|physician|"
                           rf"patient(?:\s+name)?|name|pt)\s*:?\s+(?:(?:Dr|Doctor)\.?\s+)?)(?P<v>{_NAME_SEQ})"), "v"),
    ("institution", 5, re.compile(
        r"\b(?:(?:St\.|Saint|Mount|Mt\.)\s+)?(?:[A-Z][A-Za-z'&\-]*\s+){1,5}(?:University\s+)?(?:Hospital|Medical\s+Center|"
        r"Medical\s+Centre|Clinic|Health\s+System|Health\s+Center|Healthcare|Infirmary|Imaging\s+Center|Cancer\s+Center|"
        r"Children's|Memorial)s?\b(?:\s+of\s+[A-Z][A-Za-z]+(?:\s+[A-Z][A-Za-z]+)?)?"), None),
    ("id", 6, re.compile(r"(?<![\w.,/])(?=[A-Z0-9\-]*\d{6})[A-Z]{0,6}\d[\dA-Z\-]{5,}(?![\w/])"), None),
    ("age", 7, re.compile(r"\b(?P<v>(?:9\d|1[0-4]\d))(?=\s*-?\s*(?:years?|yrs?|y/?o|y\.o\.|year-old|yo)\b)"), "v"),
    ("age", 7, re.compile(r"(?i:\b(?:age|aged)\s*:?\s*)(?P<v>(?:9\d|1[0-4]\d))\b"), "v"),
]
# words the title/phrase rules must not take as a name ("Discussed with The referring team")
_NOT_NAMES = frozenset([
    "the", "a", "an", "this", "that", "these", "those", "his", "her", "their", "patient", "team",
    "referring", "ordering", "clinical", "clinician", "service", "physician", "radiology", "emergency",
    "department", "on", "by", "at", "in", "of", "and", "with", "via", "telephone", "phone", "mrn", "id",
    "dob", "acc", "accession", "exam", "date", "md", "findings", "impression", "history", "comparison",
    "technique"
])


def _deny_category(value: str, categories: Mapping[str, str]) -> str:
    if value in categories:
        return categories[value]
    if any(p.match(value) for _, p in _DATE_PATTERNS):
        return "date"
    if re.search(r"\d", value):
        return "id"
    if re.search(r"(?i)hospital|medical|clinic|health|center|centre|infirmary", value):
        return "institution"
    return "name"


def _deny_pattern(value: str) -> str:
    words = [re.escape(w) for w in re.split(r"[\s,]+", value) if w]
    joined = r"[\s,]*\s".join(words) if "," in value else r"\s+".join(words)
    return _B + joined + _E


def _clip_name(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Drop leading/trailing words that are not names from a rule's name match."""
    words = list(re.finditer(r"[A-Za-z'\-]+", text[start:end]))
    while words and words[0].group().lower() in _NOT_NAMES:
        words.pop(0)
    while words and words[-1].group().lower() in _NOT_NAMES:
        words.pop()
    if not words:
        return None
    return start + words[0].start(), start + words[-1].end()


def _presidio_spans(text: str) -> list[tuple[int, int, str, int, str | None]]:
    """PHI spans from Presidio with a locally installed spaCy model (never downloads)."""
    try:
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError as exc:
        raise ConfigError("report backend presidio needs the presidio_analyzer package, which is not installed") from exc
    import importlib.util

    model = next((m for m in ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
                  if importlib.util.find_spec(m) is not None), None)
    if model is None:
        raise ConfigError("report backend presidio needs a locally installed spaCy English model (e.g. en_core_web_lg)")
    provider = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy",
                                                    "models": [{"lang_code": "en", "model_name": model}]})
    engine = AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])
    mapping = {"PERSON": "name", "PHONE_NUMBER": "phone", "EMAIL_ADDRESS": "email", "URL": "url",
               "LOCATION": "address", "US_SSN": "id", "MEDICAL_LICENSE": "id", "US_DRIVER_LICENSE": "id"}
    spans = []
    for r in engine.analyze(text=text, language="en", entities=list(mapping)):
        if r.score >= 0.5:
            spans.append((r.start, r.end, mapping[r.entity_type], 5, None))
    return spans


def scrub_report(text: str, *, deny: Iterable[str] = (), date_offset_days: int = 0, backend: str = "rules",
                 day_first: bool = False) -> ReportScrubResult:
    """Replace identifiers in a report with category tags and shift its dates (see the module docstring)."""
    if backend not in ("rules", "presidio"):
        raise ConfigError(f"unknown report de-identification backend {backend!r} (rules, presidio)")
    # candidate spans: (start, end, category, priority, replacement or None for the category tag)
    spans: list[tuple[int, int, str, int, str | None]] = []
    categories = getattr(deny, "categories", {}) if not isinstance(deny, Mapping) else dict(deny)
    values = sorted({" ".join(str(v).split()) for v in deny if len(str(v).strip()) >= 2}, key=len, reverse=True)
    for value in values:
        cat = _deny_category(value, categories)
        bare_part = cat == "name" and " " not in value and "," not in value
        for m in re.finditer(_deny_pattern(value), text, re.IGNORECASE):
            if bare_part and m.group().lower() in _CLINICAL_WORDS:
                continue
            spans.append((m.start(), m.end(), cat, 3 if cat == "date" else 1, None))
    for kind, pattern in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            new = _shift_date(kind, m, date_offset_days, day_first)
            if new is not None:
                spans.append((m.start(), m.end(), "date", 2, new))
    for cat, prio, pattern, group in _RULES:
        for m in pattern.finditer(text):
            start, end = m.span(group) if group else m.span()
            if cat == "name":
                clipped = _clip_name(text, start, end)
                if clipped is None:
                    continue
                start, end = clipped
            if end > start:
                spans.append((start, end, cat, prio, None))
    if backend == "presidio":
        spans += _presidio_spans(text)

    chosen: list[tuple[int, int, str, int, str | None]] = []
    taken = bytearray(len(text))
    for span in sorted(spans, key=lambda s: (s[3], -(s[1] - s[0]), s[0])):
        start, end = span[0], span[1]
        if any(taken[start:end]):
            continue
        taken[start:end] = b"\x01" * (end - start)
        chosen.append(span)
    chosen.sort()
    out, pos, replacements = [], 0, []
    for start, end, cat, _, new in chosen:
        out.append(text[pos:start])
        out.append(new if new is not None else TAGS[cat])
        replacements.append({"category": cat, "start": start, "length": end - start})
        pos = end
    out.append(text[pos:])
    return ReportScrubResult("".join(out), replacements)
