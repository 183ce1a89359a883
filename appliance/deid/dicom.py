"""Header de-identification: PS3.15 Annex E Basic Profile plus options, applied at every depth.

Rules beyond the table (the why is in ANNEX_E_SOURCE.md and the report of this stage):
- anything the table does not list is kept only if it is on ALLOWED_KEYWORDS (pixel, geometry and acquisition
  attributes needed downstream); overlays, curves, icons, graphics, signatures and private data always go
  (except the few private elements on SAFE_PRIVATE when retain_safe_private is on);
- UIDs are remapped with the site key, consistently in every file, except registered (well-known) UIDs;
- PatientName/PatientID, AccessionNumber and StudyID become keyed pseudonyms so studies still link;
- dates (DA, DT) are shifted by the patient's keyed offset, times are kept, calibration dates are never shifted,
  the birth date is emptied (age stays in PatientAge);
- "clean" keeps a descriptor only if it matches a plain pattern and holds no identifier of this dataset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_sequence
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import PersonName

from appliance.deid.annex_e import AnnexERule, load_table
from appliance.deid.keys import DeidKeys

IMPLEMENTATION_CLASS_UID = "2.25." + str(int.from_bytes(hashlib.sha256(b"rfm-appliance deid writer").digest()[:16], "big"))
IMPLEMENTATION_VERSION_NAME = "RFM_DEID_1"
PATIENT_KIND, ACCESSION_KIND, STUDY_ID_KIND, OTHER_ID_KIND = "PAT", "ACC", "STU", "ID"

DCM_METHOD_CODES = {  # CID 7050, checked against pydicom.sr._concepts_dict
    "basic": ("113100", "DCM", "Basic Application Confidentiality Profile"),
    "clean_pixel_data": ("113101", "DCM", "Clean Pixel Data Option"),
    "clean_descriptors": ("113105", "DCM", "Clean Descriptors Option"),
    "retain_longitudinal_modified_dates": ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "DCM", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "DCM", "Retain Device Identity Option"),
    "retain_safe_private": ("113111", "DCM", "Retain Safe Private Option"),
}
_METHOD_NAMES = {
    "basic": "PS3.15 E.1 Basic Profile", "clean_pixel_data": "Clean Pixel Data",
    "clean_descriptors": "Clean Descriptors", "retain_longitudinal_modified_dates": "Retain Modified Dates",
    "retain_patient_characteristics": "Retain Patient Characteristics",
    "retain_device_identity": "Retain Device Identity (model only)", "retain_safe_private": "Retain Safe Private",
}


@dataclass(frozen=True)
class DeidOptions:
    """Which Annex E options to apply on top of the Basic Profile."""

    retain_longitudinal_modified_dates: bool = True
    retain_patient_characteristics: bool = True
    retain_device_identity: bool = True
    clean_descriptors: bool = True
    clean_pixel_data: bool = True  # only recorded here; appliance.deid.pixels does the scrubbing
    retain_safe_private: bool = False

    def method_codes(self) -> list[tuple[str, str, str]]:
        """(CodeValue, CodingSchemeDesignator, CodeMeaning) for DeidentificationMethodCodeSequence."""
        return [DCM_METHOD_CODES[name] for name in self._used()]

    def method_description(self) -> list[str]:
        return [_METHOD_NAMES[name] for name in self._used()]

    def _used(self) -> list[str]:
        names = ["basic", "clean_pixel_data", "clean_descriptors", "retain_longitudinal_modified_dates",
                 "retain_patient_characteristics", "retain_device_identity", "retain_safe_private"]
        return [n for n in names if n == "basic" or getattr(self, n)]


@dataclass
class DicomDeidResult:
    """The de-identified dataset plus what the audit needs; `removed_values` is PHI and stays in memory."""

    dataset: Dataset
    removed_values: set[str]
    actions: list[dict]
    date_offset_days: int
    patient_pseudonym: str


# Standard attributes the table does not list that are kept (everything else outside the table is removed).
_ALLOWED = """
SpecificCharacterSet ImageType SOPClassUID Modality InstanceNumber SeriesNumber AcquisitionNumber
TemporalPositionIdentifier NumberOfTemporalPositions ImagesInAcquisition BodyPartExamined PatientPosition
AnatomicalOrientationType Laterality ImageLaterality PatientOrientation
SamplesPerPixel PhotometricInterpretation Rows Columns BitsAllocated BitsStored HighBit PixelRepresentation
PlanarConfiguration PixelData FloatPixelData DoubleFloatPixelData NumberOfFrames FrameIncrementPointer FrameTime
PixelPaddingValue PixelPaddingRangeLimit SmallestImagePixelValue LargestImagePixelValue PixelAspectRatio
ExtendedOffsetTable ExtendedOffsetTableLengths LossyImageCompression LossyImageCompressionRatio
LossyImageCompressionMethod BurnedInAnnotation RecognizableVisualFeatures PresentationLUTShape
RedPaletteColorLookupTableDescriptor GreenPaletteColorLookupTableDescriptor BluePaletteColorLookupTableDescriptor
RedPaletteColorLookupTableData GreenPaletteColorLookupTableData BluePaletteColorLookupTableData
PixelSpacing ImagePositionPatient ImageOrientationPatient SliceThickness SpacingBetweenSlices SliceLocation
RescaleSlope RescaleIntercept RescaleType WindowCenter WindowWidth VOILUTFunction
KVP XRayTubeCurrent XRayTubeCurrentInmA Exposure ExposureInmAs ExposureTime CTDIvol ConvolutionKernel
ReconstructionDiameter DataCollectionDiameter DataCollectionCenterPatient ReconstructionTargetCenterPatient
GantryDetectorTilt TableHeight RotationDirection FilterType GeneratorPower FocalSpots SpiralPitchFactor
SingleCollimationWidth TotalCollimationWidth TableSpeed TableFeedPerRotation RevolutionTime ScanOptions
ExposureModulationType ReconstructionAlgorithm
ScanningSequence SequenceVariant MRAcquisitionType SequenceName AngioFlag RepetitionTime EchoTime InversionTime
NumberOfAverages ImagingFrequency ImagedNucleus EchoNumbers MagneticFieldStrength NumberOfPhaseEncodingSteps
EchoTrainLength PercentSampling PercentPhaseFieldOfView PixelBandwidth AcquisitionMatrix
InPlanePhaseEncodingDirection FlipAngle VariableFlipAngleFlag SAR dBdt TriggerTime DiffusionBValue
DiffusionGradientOrientation
SharedFunctionalGroupsSequence PerFrameFunctionalGroupsSequence PixelMeasuresSequence PlanePositionSequence
PlaneOrientationSequence PixelValueTransformationSequence FrameVOILUTSequence FrameContentSequence
DimensionIndexValues InStackPositionNumber TemporalPositionIndex FrameAcquisitionNumber StackID
CTReconstructionSequence CTAcquisitionTypeSequence CTAcquisitionDetailsSequence CTGeometrySequence
CTExposureSequence CTXRayDetailsSequence CTImageFrameTypeSequence CTTableDynamicsSequence CTPositionSequence
FrameType DimensionIndexSequence DimensionIndexPointer FunctionalGroupPointer DimensionOrganizationSequence
DimensionOrganizationType AcquisitionType
ViewPosition ImagerPixelSpacing PresentationIntentType PixelIntensityRelationship PixelIntensityRelationshipSign
VOILUTSequence ModalityLUTSequence LUTDescriptor LUTData LUTExplanation ModalityLUTType WindowCenterWidthExplanation
DistanceSourceToDetector DistanceSourceToPatient EstimatedRadiographicMagnificationFactor DetectorType
FieldOfViewShape FieldOfViewDimensions Grid ExposureIndex TargetExposureIndex DeviationIndex
ReferencedSeriesSequence ReferencedSOPSequence ReferencedInstanceSequence ReferencedSOPClassUID
ReferencedFrameNumber PurposeOfReferenceCodeSequence
CodeValue CodingSchemeDesignator CodingSchemeVersion CodeMeaning LongCodeValue URNCodeValue ContextIdentifier
MappingResource
""".split()
_DEVICE_MODEL_KEYWORDS = frozenset({"Manufacturer", "ManufacturerModelName", "SoftwareVersions"})
# Rows the Retain Device Identity option may keep that name the model, not the unit: serial numbers, station
# names, detector/gantry IDs and locations would point to one machine at one site, so they stay removed.
_DEVICE_IDENTITY_KEPT_ROWS = frozenset({"LensSpecification", "LensMake", "LensModel", "SourceManufacturer",
                                        "ManufacturerDeviceClassUID"})


def _tags(keywords: Iterable[str]) -> frozenset[int]:
    tags = set()
    for kw in keywords:
        tag = tag_for_keyword(kw)
        if tag is None:
            raise ValueError(f"unknown DICOM keyword in allow-list: {kw}")
        tags.add(tag)
    return frozenset(tags)


ALLOWED_TAGS = _tags(_ALLOWED)
DEVICE_MODEL_TAGS = _tags(_DEVICE_MODEL_KEYWORDS)
ALWAYS_REMOVED_TAGS = _tags([
    "IconImageSequence", "GraphicAnnotationSequence", "DigitalSignaturesSequence", "MACParametersSequence",
    "OriginalAttributesSequence", "DataSetTrailingPadding", "EncryptedAttributesSequence",
    # our own markers are rewritten at the top level
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
])
TAG_PATIENT_NAME, TAG_PATIENT_ID = 0x00100010, 0x00100020
TAG_ACCESSION, TAG_STUDY_ID, TAG_BIRTH_DATE = 0x00080050, 0x00200010, 0x00100030

# (group, private creator, element offset) -> allowed characters in a string value. From PS3.15 Table
# E.3.10-1 as implemented in PixelMed's ClinicalTrialsAttributes.isSafePrivateAttribute: CT technique only.
SAFE_PRIVATE: dict[tuple[int, str, int], str] = {
    (0x0019, "GEMS_ACQU_01", 0x23): "Table Speed [mm/rotation]",
    (0x0019, "GEMS_ACQU_01", 0x24): "Mid Scan Time [sec]",
    (0x0019, "GEMS_ACQU_01", 0x27): "Rotation Speed (Gantry Period)",
    (0x0025, "GEMS_SERS_01", 0x07): "Images In Series",
    (0x0043, "GEMS_PARM_01", 0x27): "Scan Pitch Ratio",
    (0x0045, "GEMS_HELIOS_01", 0x01): "Number of Macro Rows in Detector",
    (0x0045, "GEMS_HELIOS_01", 0x02): "Macro width at ISO Center",
    (0x00E1, "ELSCINT1", 0x21): "DLP",
    (0x01F1, "ELSCINT1", 0x07): "Table Velocity",
    (0x01F1, "ELSCINT1", 0x26): "Pitch",
    (0x01F1, "ELSCINT1", 0x27): "Rotation Time",
}
_SAFE_PRIVATE_TEXT = re.compile(r"^[0-9.:+\-eE \\]*$")  # numbers only, e.g. "0.984:1"

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_FREE_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
_DUMMY = {"PN": "ANONYMOUS", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "LT": "ANONYMIZED", "ST": "ANONYMIZED",
          "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED", "AE": "ANONYMIZED", "AS": "000Y",
          "DA": "19000101", "DT": "19000101000000", "TM": "000000", "IS": "0", "DS": "0", "UR": ""}
_SAFE_DESCRIPTOR = re.compile(r"^[A-Za-z0-9 .,_+\-/()\[\]:%#&*=<>']*$")
_LONG_NUMBER = re.compile(r"\d{5,}")
_WRITTEN_DATE = re.compile(r"\d{1,4}[/.\-]\d{1,2}[/.\-]\d{1,4}")
_MONTH_DATE = re.compile(r"(?i)\b(JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC)[A-Z]*\b[\s.\-/]*\d|\d[\s.\-/]*"
                         r"(JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC)")
_PHRASE_KEYWORDS = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "PatientAddress",
                    "ReferringPhysicianAddress", "StationName")
_IDENTIFIER_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "DeviceSerialNumber", "StationName",
                        "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
                        "AdmissionID", "IssuerOfPatientID", "MedicalRecordLocator")


def _is_well_known_uid(uid: str) -> bool:
    return uid in UID_dictionary or uid.startswith("1.2.840.10008.")


def _values(value) -> list:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _shift_date(text: str, days: int) -> str | None:
    """Shift a DA value ('YYYYMMDD', or ACR-NEMA 'YYYY.MM.DD'); None when it is not a full date."""
    digits = text.strip().replace(".", "") if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text.strip()) else text.strip()
    if not re.fullmatch(r"\d{8}", digits):
        return None
    try:
        day = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None
    return (day + dt.timedelta(days=days)).strftime("%Y%m%d")


def _shift_datetime(text: str, days: int) -> str | None:
    """Shift the date part of a DT value and keep time and timezone; None without a full date."""
    text = text.strip()
    shifted = _shift_date(text[:8], days) if len(text) >= 8 else None
    return None if shifted is None else shifted + text[8:]


def _printable_runs(data: bytes) -> list[str]:
    return [m.decode("latin-1").strip() for m in re.findall(rb"[\x20-\x7e]{4,}", data) if m.strip()]


def _parse_un_sequence(elem: DataElement, encoding) -> Sequence | None:
    """Read a UN value that holds an implicit-VR little-endian sequence (private SQ of an implicit-VR file)."""
    value = elem.value
    if not isinstance(value, bytes) or not value.startswith(b"\xfe\xff\x00\xe0"):
        return None
    try:
        return read_sequence(DicomBytesIO(value), True, True, len(value), encoding)
    except Exception:  # noqa: BLE001 - anything unparseable is removed by the caller
        return None


class _HeaderDeidentifier:
    def __init__(self, source: Dataset, keys: DeidKeys, options: DeidOptions):
        self.keys, self.options, self.table = keys, options, load_table()
        self.removed_values: set[str] = set()
        self.actions: list[dict] = []
        self.dates_shifted = False
        self.patient_id = str(source.get("PatientID", "") or "").strip()
        patient_key = self.patient_id or str(source.get("PatientName", "") or "").strip()
        self.patient_pseudonym = keys.pseudonym(PATIENT_KIND, patient_key)
        self.date_offset = keys.date_offset_days(self.patient_id)
        self.study_uid = str(source.get("StudyInstanceUID", "") or "").strip()
        self.encoding = source._character_set if hasattr(source, "_character_set") else "iso8859"
        self.deny_tokens, self.deny_phrases = self._identifiers(source)

    # ---- identifiers of this dataset, used by the clean rule ----
    def _identifiers(self, ds: Dataset) -> tuple[set[str], list[str]]:
        tokens: set[str] = set()
        phrases: list[str] = []
        id_tags = {tag_for_keyword(k) for k in _IDENTIFIER_KEYWORDS}
        phrase_tags = {tag_for_keyword(k) for k in _PHRASE_KEYWORDS}
        try:
            elements = list(ds.iterall())
        except Exception:  # noqa: BLE001 - a broken element only costs us some deny tokens
            elements = []
        for elem in elements:
            if elem.VR == "PN" or elem.tag in id_tags:
                for v in _values(elem.value):
                    for tok in re.findall(r"[A-Za-z0-9]+", str(v).upper()):
                        if len(tok) >= 3 or (len(tok) >= 2 and any(c.isdigit() for c in tok)):
                            tokens.add(tok)
            if elem.tag in phrase_tags:
                phrases += [str(v).strip().upper() for v in _values(elem.value) if len(str(v).strip()) >= 4]
        return tokens, phrases

    def _text_is_safe(self, text: str) -> bool:
        upper = text.upper()
        if any(p in upper for p in self.deny_phrases):
            return False
        return not any(tok in self.deny_tokens for tok in re.findall(r"[A-Z0-9]+", upper))

    def _descriptor_is_clean(self, text: str) -> bool:
        """Clean Descriptors rule: short, plain characters, no long numbers or dates, no identifier of this dataset."""
        text = text.strip()
        return (len(text) <= 64 and bool(_SAFE_DESCRIPTOR.match(text)) and not _LONG_NUMBER.search(text)
                and not _WRITTEN_DATE.search(text) and not _MONTH_DATE.search(text) and self._text_is_safe(text))

    # ---- bookkeeping ----
    def _log(self, path: str, tag: int, action: str) -> None:
        self.actions.append({"path": path, "keyword": keyword_for_tag(tag) or "", "action": action})

    def _collect(self, elem: DataElement, private: bool = False) -> None:
        """Remember every original string value of an element that is removed or replaced (recursively)."""
        if elem.VR == "SQ":
            for item in elem.value or []:
                for sub in self._iter(item):
                    if sub is not None:
                        self._collect(sub, private or bool(sub.tag.is_private))
            return
        if elem.VR in _TEXT_VRS:
            for v in _values(elem.value):
                s = str(v).strip().rstrip("\x00")
                if s and not (elem.VR == "UI" and _is_well_known_uid(s)):
                    self.removed_values.add(s)
                    if isinstance(v, PersonName):
                        self.removed_values.update(c.strip() for c in s.split("^") if len(c.strip()) >= 2)
        elif private and isinstance(elem.value, bytes):
            seq = _parse_un_sequence(elem, self.encoding)
            if seq is not None:
                self._collect(DataElement(elem.tag, "SQ", seq), True)
            else:
                self.removed_values.update(_printable_runs(elem.value))

    @staticmethod
    def _iter(ds: Dataset):
        for tag in list(ds.keys()):
            try:
                yield ds[tag]
            except Exception:  # noqa: BLE001 - an element pydicom cannot decode is dropped by the caller
                yield None

    # ---- the walk ----
    def dataset(self, ds: Dataset, path: str) -> Dataset:
        out = Dataset()
        creators: dict[tuple[int, int], str] = {}
        for tag in list(ds.keys()):
            tag = int(tag)
            here = f"{path}({tag >> 16:04X},{tag & 0xFFFF:04X})"
            try:
                elem = ds[tag]
            except Exception:  # noqa: BLE001
                self._log(here, tag, "unreadable-removed")
                self._collect_raw(ds, tag)
                continue
            group, element = tag >> 16, tag & 0xFFFF
            if group == 0x0002:
                continue  # file meta is rebuilt by _file_meta
            if group % 2 == 1 or group in (0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF):
                if 0x0010 <= element <= 0x00FF:
                    creators[(group, element)] = str(elem.value).strip() if elem.value else ""
                    continue  # creators are added back only for kept private elements
                self._private(out, elem, here, creators)
                continue
            self._standard(out, elem, here)
        return out

    def _collect_raw(self, ds: Dataset, tag: int) -> None:
        raw = ds._dict.get(tag)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes):
            self.removed_values.update(_printable_runs(value))

    def _private(self, out: Dataset, elem: DataElement, here: str, creators: dict) -> None:
        group, element = elem.tag >> 16, elem.tag & 0xFFFF
        creator = creators.get((group, element >> 8), "")
        safe = (self.options.retain_safe_private and (group, creator, element & 0xFF) in SAFE_PRIVATE
                and elem.VR != "SQ")
        if safe and isinstance(elem.value, str | bytes | MultiValue | list):
            text = elem.value.decode("latin-1") if isinstance(elem.value, bytes) else "\\".join(map(str, _values(elem.value)))
            safe = elem.VR not in _TEXT_VRS | {"UN"} or bool(_SAFE_PRIVATE_TEXT.match(text.strip().rstrip("\x00")))
        if safe:
            creator_tag = (group << 16) | (element >> 8)
            if creator_tag not in out:
                out.add_new(creator_tag, "LO", creator)
            out.add(elem)
            self._log(here, elem.tag, "K-safe-private")
            return
        self._collect(elem, private=True)
        self._log(here, elem.tag, "private-removed")

    def _rule_action(self, rule: AnnexERule, vr: str) -> str:
        o = self.options
        if (o.retain_longitudinal_modified_dates and rule.option("retain_long_modified_dates") == "C"
                and "calibration" not in rule.name.lower()):
            if vr in ("DA", "DT"):
                return "shift"
            if vr == "TM":
                return "K"  # times of day alone do not date anything once the dates are shifted
        if o.retain_patient_characteristics and rule.option("retain_patient_characteristics") == "K":
            return "K"
        if o.retain_device_identity and rule.option("retain_device_identity") == "K" \
                and rule.keyword in _DEVICE_IDENTITY_KEPT_ROWS:
            return "K"
        cleanable = [rule.option("clean_descriptors")]
        if o.retain_patient_characteristics:
            cleanable.append(rule.option("retain_patient_characteristics"))
        if o.clean_descriptors and "C" in cleanable:
            return "C"
        basic = rule.basic
        if basic == "X/Z/U*":
            return "U*" if vr == "SQ" else "X"
        if basic.startswith("X/"):
            return "X"  # removal is always allowed for us: the IOD's type 1/2 rules matter less than leaks
        if basic == "Z/D":
            return "Z"
        return basic

    def _standard(self, out: Dataset, elem: DataElement, here: str) -> None:
        tag, vr = int(elem.tag), elem.VR
        group = tag >> 16
        if tag in ALWAYS_REMOVED_TAGS or (group & 0xFF00) in (0x5000, 0x6000) or (0x7F00 <= group < 0x7FE0) \
                or (0x7FE1 <= group <= 0x7FFF):
            self._collect(elem)
            self._log(here, tag, "X")
            return
        if tag in (TAG_PATIENT_NAME, TAG_PATIENT_ID):
            return self._replace(out, elem, here, self.patient_pseudonym if elem.value else "", "pseudonym")
        if tag == TAG_ACCESSION:
            value = str(elem.value or "").strip()
            return self._replace(out, elem, here, self.keys.pseudonym(ACCESSION_KIND, value) if value else "",
                                 "pseudonym")
        if tag == TAG_STUDY_ID:
            value = str(elem.value or "").strip()
            return self._replace(out, elem, here, self.keys.pseudonym(STUDY_ID_KIND, self.study_uid or value)
                                 if value else "", "pseudonym")
        if tag == TAG_BIRTH_DATE:
            return self._replace(out, elem, here, "", "Z")
        rule = self.table.rule_for(tag)
        if rule is None:
            allowed = tag in ALLOWED_TAGS or (self.options.retain_device_identity and tag in DEVICE_MODEL_TAGS)
            if not allowed:
                self._collect(elem)
                self._log(here, tag, "X-not-allowed")
                return
            return self._keep(out, elem, here, logged=False)
        action = self._rule_action(rule, vr)
        if action == "K":
            return self._keep(out, elem, here, logged=True)
        if action == "X":
            self._collect(elem)
            self._log(here, tag, "X")
        elif action == "Z":
            self._replace(out, elem, here, Sequence() if vr == "SQ" else None, "Z")
        elif action == "D":
            self._dummy(out, elem, here)
        elif action in ("U", "U*"):
            self._uid(out, elem, here)
        elif action == "shift":
            self._shift(out, elem, here)
        elif action == "C":
            self._clean(out, elem, here)
        else:
            raise ValueError(f"annex E action {action!r} not handled for {rule.tag}")

    def _keep(self, out: Dataset, elem: DataElement, here: str, logged: bool) -> None:
        if elem.VR == "SQ":
            out.add(DataElement(elem.tag, "SQ", Sequence(
                self.dataset(item, f"{here}[{i}].") for i, item in enumerate(elem.value or []))))
            return
        if elem.VR in _FREE_TEXT_VRS and not all(self._text_is_safe(str(v)) for v in _values(elem.value)):
            self._collect(elem)
            self._log(here, elem.tag, "X-identifier-in-text")
            return
        out.add(elem)
        if logged:
            self._log(here, elem.tag, "K")

    def _replace(self, out: Dataset, elem: DataElement, here: str, value, action: str) -> None:
        self._collect(elem)
        out.add(DataElement(elem.tag, elem.VR, value))
        self._log(here, elem.tag, action)

    def _dummy(self, out: Dataset, elem: DataElement, here: str) -> None:
        vr = elem.VR
        if vr == "SQ":
            return self._keep(out, elem, here, logged=False)  # the items are de-identified one by one
        if vr == "UI":
            return self._uid(out, elem, here)
        keyword = keyword_for_tag(elem.tag) or ""
        if vr in ("LO", "SH") and re.search(r"(ID|Identifier|Number)$", keyword) and elem.value:
            value = [self.keys.pseudonym(OTHER_ID_KIND, str(v)) for v in _values(elem.value)]
            return self._replace(out, elem, here, value if len(value) > 1 else value[0], "pseudonym")
        if vr in _DUMMY:
            dummy = _DUMMY[vr] if elem.value not in (None, "") else ""
        elif vr in _NUMERIC_VRS:
            dummy = 0 if elem.value not in (None, b"", []) else None
        else:
            self._collect(elem)
            self._log(here, elem.tag, "X")  # binary values have no meaningful dummy
            return
        self._replace(out, elem, here, dummy, "D")

    def _uid(self, out: Dataset, elem: DataElement, here: str) -> None:
        if elem.VR == "SQ":
            return self._keep(out, elem, here, logged=False)  # U*: keep the references, remap their UIDs
        if elem.VR != "UI":
            self._collect(elem)
            self._log(here, elem.tag, "X")
            return
        mapped = []
        for v in _values(elem.value):
            uid = str(v).strip().rstrip("\x00")
            if not uid or _is_well_known_uid(uid):
                mapped.append(uid)
            else:
                self.removed_values.add(uid)
                mapped.append(self.keys.uid(uid))
        out.add(DataElement(elem.tag, "UI", mapped if len(mapped) > 1 else (mapped[0] if mapped else None)))
        self._log(here, elem.tag, "U")

    def _shift(self, out: Dataset, elem: DataElement, here: str) -> None:
        shift = _shift_date if elem.VR == "DA" else _shift_datetime
        shifted, ok = [], True
        for v in _values(elem.value):
            new = shift(str(v), self.date_offset)
            ok = ok and new is not None
            shifted.append(new)
        self._collect(elem)
        if not ok:
            out.add(DataElement(elem.tag, elem.VR, None))
            self._log(here, elem.tag, "Z-unparseable-date")
            return
        if shifted:
            self.dates_shifted = True
        out.add(DataElement(elem.tag, elem.VR, shifted if len(shifted) > 1 else (shifted[0] if shifted else None)))
        self._log(here, elem.tag, "shift")

    def _clean(self, out: Dataset, elem: DataElement, here: str) -> None:
        if elem.VR == "SQ":
            return self._keep(out, elem, here, logged=False)
        if elem.VR in ("LO", "SH", "ST", "LT", "UT", "UC", "CS") and all(
                self._descriptor_is_clean(str(v)) for v in _values(elem.value)):
            out.add(elem)
            self._log(here, elem.tag, "C-kept")
            return
        self._collect(elem)
        self._log(here, elem.tag, "C-removed")


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _file_meta(source: Dataset, out: Dataset, keys: DeidKeys) -> FileMetaDataset:
    old = getattr(source, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = out.get("SOPClassUID") or old.get("MediaStorageSOPClassUID") or ""
    old_instance = str(old.get("MediaStorageSOPInstanceUID", "") or "").strip()
    meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID") or (keys.uid(old_instance) if old_instance else "")
    transfer = old.get("TransferSyntaxUID")
    if not transfer:
        implicit = getattr(source, "original_encoding", (False, True))[0]
        transfer = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.TransferSyntaxUID = transfer
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def deidentify_dataset(ds: Dataset, keys: DeidKeys, options: DeidOptions = DeidOptions()) -> DicomDeidResult:
    """A de-identified copy of `ds` (the input is not modified) with the audit trail; see the module docstring."""
    worker = _HeaderDeidentifier(ds, keys, options)
    with pydicom_config.disable_value_validation():
        out = worker.dataset(ds, "")
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = options.method_description()
        out.DeidentificationMethodCodeSequence = Sequence(_code_item(c) for c in options.method_codes())
        if worker.dates_shifted:
            out.LongitudinalTemporalInformationModified = "MODIFIED"
        elif not options.retain_longitudinal_modified_dates:
            out.LongitudinalTemporalInformationModified = "REMOVED"
        out.file_meta = _file_meta(ds, out, keys)
    out.preamble = b"\x00" * 128
    return DicomDeidResult(dataset=out, removed_values=worker.removed_values, actions=worker.actions,
                           date_offset_days=worker.date_offset, patient_pseudonym=worker.patient_pseudonym)


def write_deidentified(result: DicomDeidResult, path: Path) -> None:
    """Write as a DICOM file with a zero preamble and the rebuilt file meta, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = result.dataset
    ds.preamble = b"\x00" * 128
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with pydicom_config.disable_value_validation():
                pydicom.dcmwrite(fh, ds, enforce_file_format=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
