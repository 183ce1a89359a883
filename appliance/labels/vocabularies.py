"""Finding vocabularies: which findings a report is labelled for, what they mean, and how reports say them.

Built-in vocabularies live in `appliance/labels/data/<name>.yaml`; `load_vocabulary` also takes the path
of a site's own file in the same format:

    name: my_vocabulary                # required, a short identifier
    findings:                          # required, non-empty, names unique (case-insensitive)
      - name: pleural effusion         # required, canonical name (the label key)
        definition: Fluid in the pleural space.   # required, one sentence a radiologist/LLM can apply
        synonyms: [pleural effusion, pleural fluid, hydrothorax]
            # optional (default: [name]); lowercase phrases that mention the finding. Matching is
            # case-insensitive on word boundaries, "-" and " " are interchangeable, and each word may take
            # a plural "s"/"es". "*" stands for a gap of up to 10 words inside one clause, e.g.
            # "heart * enlarged" matches "the heart is mildly enlarged".
        negative_phrases: [lungs are clear]
            # optional: phrases that state the finding is absent without naming it ("heart size is
            # normal" for cardiomegaly); a match always counts as a negated mention.
        exclusions: [subpleural effusion]
            # optional: longer phrases that contain a synonym but are a different thing ("subcutaneous
            # emphysema" for emphysema); a synonym match inside an exclusion is not a mention.

Several vocabularies joined with "+" make one composite ("cxr_19+cxr_lines_tubes_10": findings in order,
names unique, one fingerprint of the whole).

Lines and tubes (`cxr_lines_tubes_10`): each device is two findings, "<device>" (present or absent) and
"<device> malpositioned" (present only when the report says the placement is wrong); a correctly placed
device is "<device>" 1 and "<device> malpositioned" 0. So the vocabulary has 20 findings for 10 devices.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from appliance.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_VOCABULARIES = ("ct_rate_18", "merlin_30", "cxr_19", "cxr_lines_tubes_10", "chexpert_14")

# CT-RATE's 18 abnormalities, in the dataset's own order (RECIPES.md section 1).
CT_RATE_18: tuple[str, ...] = (
    "medical material",
    "arterial wall calcification",
    "cardiomegaly",
    "pericardial effusion",
    "coronary artery wall calcification",
    "hiatal hernia",
    "lymphadenopathy",
    "emphysema",
    "atelectasis",
    "lung nodule",
    "lung opacity",
    "pulmonary fibrotic sequela",
    "pleural effusion",
    "mosaic attenuation pattern",
    "peribronchial thickening",
    "consolidation",
    "bronchiectasis",
    "interlobular septal thickening",
)

_FINDING_KEYS = {"name", "definition", "synonyms", "negative_phrases", "exclusions"}
_VOCABULARY_KEYS = {"name", "description", "findings"}


@dataclass(frozen=True)
class Finding:
    """One label of a vocabulary."""

    name: str
    definition: str
    synonyms: tuple[str, ...]
    negative_phrases: tuple[str, ...] = ()
    exclusions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of findings; label vectors follow this order."""

    name: str
    findings: tuple[Finding, ...]
    description: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def finding(self, name: str) -> Finding:
        for f in self.findings:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict:
        out: dict = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["findings"] = []
        for f in self.findings:
            item = {"name": f.name, "definition": f.definition, "synonyms": list(f.synonyms)}
            if f.negative_phrases:
                item["negative_phrases"] = list(f.negative_phrases)
            if f.exclusions:
                item["exclusions"] = list(f.exclusions)
            out["findings"].append(item)
        return out

    def fingerprint(self) -> str:
        """12 hex digits of SHA-256 over the content that changes labels (not the description)."""
        content = self.to_dict()
        content.pop("description", None)
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)


def _phrases(value, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of non-empty strings")
    return tuple(" ".join(v.lower().split()) for v in value)


def vocabulary_from_dict(data, source: str = "vocabulary") -> Vocabulary:
    """Validate a parsed vocabulary file; every problem is one ConfigError line naming `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'name' and 'findings'")
    unknown = sorted(set(data) - _VOCABULARY_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(str, unknown))} (allowed: name, description, findings)")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: 'name' must be a non-empty string")
    items = data.get("findings")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{source}: 'findings' must be a non-empty list")
    findings, seen = [], set()
    for i, item in enumerate(items, 1):
        where = f"{source}: finding {i}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with name, definition, synonyms")
        unknown = sorted(set(item) - _FINDING_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
        fname, definition = item.get("name"), item.get("definition")
        if not isinstance(fname, str) or not fname.strip():
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        fname = " ".join(fname.split())
        where = f"{source}: finding '{fname}'"
        if fname.lower() in seen:
            raise ConfigError(f"{where}: duplicate finding name")
        seen.add(fname.lower())
        if not isinstance(definition, str) or not definition.strip():
            raise ConfigError(f"{where}: 'definition' must be a non-empty string")
        synonyms = _phrases(item["synonyms"], where, "synonyms") if "synonyms" in item else (fname.lower(),)
        findings.append(Finding(name=fname, definition=" ".join(definition.split()), synonyms=synonyms,
                                negative_phrases=_phrases(item.get("negative_phrases"), where, "negative_phrases"),
                                exclusions=_phrases(item.get("exclusions"), where, "exclusions")))
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{source}: 'description' must be a string")
    return Vocabulary(name=name.strip(), findings=tuple(findings), description=" ".join(description.split()))


def combine_vocabularies(parts: list[Vocabulary]) -> Vocabulary:
    """One vocabulary of several, findings in order ("cxr_19+cxr_lines_tubes_10"); names must stay unique."""
    name = "+".join(v.name for v in parts)
    seen: dict[str, str] = {}
    for v in parts:
        for f in v.findings:
            if f.name.lower() in seen:
                raise ConfigError(f"vocabulary '{name}': finding '{f.name}' is in both {seen[f.name.lower()]} and {v.name}")
            seen[f.name.lower()] = v.name
    return Vocabulary(name=name, findings=tuple(f for v in parts for f in v.findings),
                      description=f"Composite of {', '.join(v.name for v in parts)}.")


def load_vocabulary(name_or_path: str | Path) -> Vocabulary:
    """A built-in vocabulary by name (BUILTIN_VOCABULARIES), a vocabulary YAML file by path, or several of
    either joined by "+" (a composite: findings concatenated in order, names unique, one fingerprint)."""
    if isinstance(name_or_path, Vocabulary):
        return name_or_path
    text = str(name_or_path)
    if isinstance(name_or_path, str) and "+" in text and not Path(text).is_file():
        parts = [p.strip() for p in text.split("+")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"vocabulary '{text}': a composite is two or more names joined by '+'")
        return combine_vocabularies([load_vocabulary(p) for p in parts])
    if isinstance(name_or_path, str) and text in BUILTIN_VOCABULARIES:
        path, source = DATA_DIR / f"{text}.yaml", f"vocabulary '{text}'"
    else:
        path = Path(name_or_path)
        source = f"vocabulary file {path.name}"
        if path.suffix.lower() not in (".yaml", ".yml") and not path.exists():
            raise ConfigError(f"unknown vocabulary '{text}' (built-in: {', '.join(BUILTIN_VOCABULARIES)}; "
                              "or give the path of a .yaml file)")
        if not path.is_file():
            raise ConfigError(f"{source} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{at}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot be read ({type(exc).__name__})") from None
    return vocabulary_from_dict(data, source)
