"""Rule-based report labeller (NegEx / CheXpert-labeler style): the embedded default, no model needed.

Pipeline per report:
1. Sentences. Wrapped lines are re-joined; a new line starts a sentence when the previous one ended with
   punctuation or the next starts with a capital, a list number or a "HEADER:". Sentences also end at
   ". ! ? ;" and at ": " (so "FINDINGS: No effusion." gives the header and a sentence). Abbreviations
   ("approx.", "e.g.", "Dr.", "vs.") and decimals ("3.2 cm") do not end sentences. Sentences under a header
   that is not about the images (clinical history, indication, comparison, technique...) are skipped, so
   "INDICATION: follow-up of pulmonary nodule" is not a nodule.
2. Mentions: each finding's synonyms (see vocabularies.py for the phrase syntax) and its negative phrases
   ("heart size is normal"); matches inside the finding's exclusions ("subcutaneous emphysema") are dropped,
   as is a one-word mention inside a longer mention of another finding ("effusion" in "pericardial
   effusion").
3. Each mention is negative, uncertain or positive, from triggers in its clause (a sentence cut at "but",
   "however", "although", "except", "there is"...):
   - pre-triggers within 14 words before it (long enough for "no a, b, c or d") ("no", "without", "negative for", "free of", "no evidence of",
     "resolved"; "possible", "likely", "questionable", "suspicious for", "may represent", "versus",
     "borderline", "and/or"...), or anywhere inside a "*" gap of the synonym ("the heart is not enlarged");
   - post-triggers within 8 words after it, not across a comma ("... is not seen", "... has resolved",
     "... cannot be excluded", "... is suspected");
   - a "?" right before or after it is uncertain.
   A pre-trigger's reach also stops at a verb ("No effusion is seen and the heart is enlarged": the "no"
   does not reach the heart). Phrases that look like negations but are not are masked first ("no interval
   change in the effusion"). Negations that contain a hedge ("cannot exclude", "not ruled out") are
   uncertain; otherwise negation wins over a hedge in the same clause.
   "likely"/"probable" are uncertain, as in the CheXpert labeler ("bibasilar opacities, likely atelectasis":
   opacity 1, atelectasis -1); "consistent with"/"compatible with" are positive.
4. A finding's label combines its mentions as the CheXpert labeler does: positive > uncertain > negative.
   Unmentioned findings are 0 (CT-RATE style: binary with uncertain); `unmentioned=None` leaves them blank
   as CheXpert does. A "<device> malpositioned" finding that is positive or uncertain makes "<device>"
   positive (lines and tubes, see vocabularies.py). A finding named "No Finding" is 1 when no other finding
   except "Support Devices" is positive or uncertain (CheXpert's rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from appliance.labels.vocabularies import Vocabulary

PRE_WINDOW = 14  # words between a pre-trigger and the mention (lists: "no a, b, c, or d")
POST_WINDOW = 8
GAP_WORDS = 10  # what "*" in a synonym may span

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}

# Headers whose text is not a finding of this exam.
_SKIP_SECTIONS = re.compile(
    r"^(?:clinical |brief )?(?:history|indications?|reason(?: for (?:exam|study|examination|request))?|"
    r"clinical (?:information|indication|data|question|details)|comparisons?|technique|procedure|exam|"
    r"examination|study|patient|name|mrn|accession|dob|date|referring(?: physician)?|ordering physician|"
    r"dictated by|signed by|protocol|contrast|dose|dlp|ctdi(?:vol)?|medications?)$")

_ABBREVIATIONS = re.compile(
    r"\b(approx|appx|e\.g|i\.e|dr|drs|vs|etc|mr|mrs|ms|fig|incl|resp|cf|pt|pts|st|sr|jr|ca|no(?=\.\s*\d))\.",
    re.IGNORECASE)
_INITIAL = re.compile(r"\b([A-Z])\.(?=\s[A-Z][a-z])")
_DOT = "\x00"
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|:\s+|:$")
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
_LIST_ONLY = re.compile(r"^\(?\d{1,2}[.)]$")
_HEADER_LINE = re.compile(r"^[A-Z][A-Za-z /&()\-]{0,40}:")
_WORD = re.compile(r"[\w']+")


def _alternation(phrases) -> str:
    return "|".join(sorted(phrases, key=len, reverse=True))


_PRE_NEG = _alternation([
    r"no", r"not", r"without", r"negative for", r"free of", r"clear of", r"absence of", r"absent", r"no evidence of",
    r"no signs? of", r"no findings? (?:of|to suggest)", r"no radiographic evidence of", r"resolution of", r"resolved",
    r"resolving", r"interval removal of", r"removal of", r"nor", r"none", r"never", r"no longer", r"ruled out",
    r"denies", r"rather than", r"negative", r"disappearance of", r"lack of",
])
_PRE_NEG_UNC = _alternation([
    r"cannot exclude", r"can ?not exclude", r"can't exclude", r"cannot rule out", r"can ?not rule out",
    r"can't rule out", r"not excluded", r"not ruled out", r"difficult to exclude", r"not be excluded",
    r"cannot be excluded", r"cannot be ruled out", r"could not exclude", r"unable to exclude", r"not entirely excluded",
])
_PRE_UNC = _alternation([
    r"possible", r"possibly", r"probable", r"probably", r"likely", r"questionable", r"questionably", r"question of",
    r"query", r"suspicious for", r"suspicious of", r"suspicion (?:of|for)", r"suspected", r"suspect", r"concern for",
    r"concerning for", r"may represent", r"may reflect", r"may be", r"may indicate", r"might", r"could be",
    r"could represent", r"could reflect", r"differential(?: diagnosis)?(?: includes?| considerations? include)?",
    r"versus", r"vs", r"borderline", r"equivocal", r"indeterminate", r"uncertain", r"suggestive of", r"suggests",
    r"suggesting", r"suggest", r"raises? the possibility of", r"consider", r"considered", r"presumed", r"presumably",
    r"presumptive", r"rule out", r"r/o", r"to exclude", r"evaluate for", r"evaluation for", r"eval for", r"assess for", r"worrisome for",
    r"favor", r"favored", r"in keeping with early", r"cannot be characterized", r"not definitely", r"and/or",
])
_COPULA = r"(?:(?:is|are|was|were|has|have|had)\s+(?:been\s+)?(?:now\s+)?)?"
_POST_NEG = _COPULA + "(?:" + _alternation([
    r"(?:not|no longer)\s+(?:\w+\s+)?(?:seen|identified|visualized|visualised|present|appreciated|demonstrated|"
    r"evident|detected|noted|apparent|visible|shown|found)",
    r"resolved", r"absent", r"removed", r"excluded", r"ruled out", r"unlikely", r"negative", r"gone",
]) + ")"
_POST_NEG_UNC = _COPULA + r"(?:cannot|can ?not|can't|could not|not)\s+(?:be\s+)?(?:\w+\s+)?(?:excluded|ruled out)"
_POST_UNC = "(?:" + _alternation([
    r"(?:is|are|was|were)\s+(?:also\s+)?(?:possible|likely|probable|suspected|questioned|questionable|uncertain|"
    r"equivocal|indeterminate|favou?red|considered|not certain)",
    r"versus", r"vs", r"or not", r"(?:may|might|could)\s+be\s+present", r"is a consideration", r"suspected",
    r"questionable", r"not (?:entirely )?certain", r"and/or",
]) + ")"
_PSEUDO = _alternation([
    r"(?:no|without) (?:(?:significant|interval|appreciable|substantial|definite|major|further|marked|notable|"
    r"substantive|radiographic|real|short-term|overall|measurable|visible|apparent|obvious|gross|clear|"
    r"significantly)\s+){0,3}(?:change|changes|increase|decrease|progression|worsening|improvement|growth)", r"not only", r"not necessarily",
    r"gram[- ]negative", r"no other", r"not changed", r"not significantly changed",
])
_BOUNDED = r"(?<![\w-])(?:{})(?![\w-])"
_TRIGGERS = {  # name: (regex, priority, role)
    "pseudo": (re.compile(_BOUNDED.format(_PSEUDO)), 0, "both"),
    "pre_neg_unc": (re.compile(_BOUNDED.format(_PRE_NEG_UNC)), 1, "pre"),
    "post_neg_unc": (re.compile(_BOUNDED.format(_POST_NEG_UNC)), 1, "post"),
    "pre_neg": (re.compile(_BOUNDED.format(_PRE_NEG)), 2, "pre"),
    "post_neg": (re.compile(_BOUNDED.format(_POST_NEG)), 2, "post"),
    "pre_unc": (re.compile(_BOUNDED.format(_PRE_UNC)), 3, "pre"),
    "post_unc": (re.compile(_BOUNDED.format(_POST_UNC)), 3, "post"),
}
_CLAUSE_BREAK = re.compile(
    r"(?<![\w-])(?:but|however|although|though|whereas|while|except|aside from|apart from|other than|otherwise|"
    r"nevertheless|yet|with the exception of|there (?:is|are|was|were|has been|have been))(?![\w-])|;")
# A pre-trigger does not reach past a verb ("no effusion is seen and the heart is enlarged").
_PRE_BLOCK = re.compile(r"\b(?:is|are|was|were|has|have|had|appears?|remains?|shows?|demonstrates?|measures?|"
                        r"measuring|seen|noted|identified|present)\b")
_POST_BLOCK = re.compile(r",|\b(?:is|are|was|were|has|have|had|appears?|remains?|shows?|demonstrates?|measures?|"
                         r"measuring)\b")


@dataclass
class RuleLabels:
    """Labels for one report: finding -> 1 | 0 | -1 (None when unmentioned and asked to leave blank)."""

    labels: dict[str, int | None]
    evidence: dict[str, str] = field(default_factory=dict)  # the sentence that decided each non-zero label


# --- sentences -----------------------------------------------------------------------------------------

def split_sentences(text: str) -> list[tuple[str, str]]:
    """(section, sentence) pairs in report order; section is the lower-cased last header ("" before any)."""
    logical: list[str] = []
    buf = ""
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = " ".join(raw.split())
        if not line:
            if buf:
                logical.append(buf)
            logical.append("")  # paragraph break
            buf = ""
            continue
        if buf and (buf[-1] in ".:;!?" or line[0].isupper() or line[0].isdigit() or _LIST_MARKER.match(line)
                    or _HEADER_LINE.match(line)):
            logical.append(buf)
            buf = line
        else:
            buf = f"{buf} {line}" if buf else line
    if buf:
        logical.append(buf)

    out: list[tuple[str, str]] = []
    section, skipping = "", False
    for line in logical:
        if not line:
            skipping = False
            continue
        line = _LIST_MARKER.sub("", line)
        protected = _INITIAL.sub(lambda m: m.group(1) + _DOT, _ABBREVIATIONS.sub(lambda m: m.group(1) + _DOT, line))
        pieces = _SENTENCE_END.split(protected)
        seps = [m.group(0) for m in _SENTENCE_END.finditer(protected)]
        starts_with_header = False
        for i, piece in enumerate(pieces):
            piece = _LIST_MARKER.sub("", piece.replace(_DOT, ".")).strip()
            if _LIST_ONLY.match(piece):  # "2." of an inline numbered list
                continue
            is_header = i < len(seps) and seps[i].startswith(":") and 0 < len(piece) <= 40
            if is_header:
                section = " ".join(piece.lower().split())
                skipping = bool(_SKIP_SECTIONS.match(section))
                starts_with_header = starts_with_header or i == 0
                continue
            if i == 0 and not starts_with_header and skipping:
                skipping = False  # a new line without a header leaves a skipped one-line section
            if piece and not skipping:
                out.append((section, piece))
    return out


# --- phrase compilation --------------------------------------------------------------------------------

def _word_pattern(word: str) -> str:
    if "-" in word.strip("-"):
        return r"[\s-]?".join(_word_pattern(p) for p in word.split("-") if p)
    w = re.escape(word)
    if not word.isalpha() or len(word) < 3:
        return w
    if word.endswith("sis") and len(word) >= 6:  # atelectasis / atelectases
        return re.escape(word[:-2]) + "(?:is|es)"
    if word.endswith("y") and word[-2] not in "aeiou":  # opacity / opacities
        return re.escape(word[:-1]) + "(?:y|ies)"
    if word.endswith("s"):
        return w
    if word.endswith(("x", "ch", "sh")):
        return w + "(?:es)?"
    return w + "s?"


_GAP = r"((?:[\s,]+[^\s.;,]+){0,%d}?)[\s,]+" % GAP_WORDS


def _phrase_pattern(phrase: str) -> tuple[str, bool]:
    """Regex source (without word boundaries) for a vocabulary phrase and whether it has "*" gaps (each gap
    a capture group)."""
    parts, has_gap = [], False
    for token in phrase.lower().split():
        if token == "*":
            parts.append(None)
            has_gap = True
        else:
            parts.append(_word_pattern(token))
    src = ""
    for prev, part in zip([""] + parts[:-1], parts):
        if part is None:
            src += _GAP
        elif src and prev is not None:
            src += r"[\s-]+" + part
        else:
            src += part
    return src, has_gap


_START, _END = r"(?<![\w-])", r"(?![\w])"


def _anchor(phrase: str) -> str:
    """First 4 characters of the phrase's first word: a cheap test that a sentence may contain it."""
    return _WORD.findall(phrase.lower())[0][:4]


def _sentence_keys(text: str) -> set[str]:
    words = _WORD.findall(text)
    return {w[:4] for w in words} | {w[:3] for w in words} | {w[:2] for w in words}


@dataclass
class _PhraseSet:
    anchors: frozenset[str]  # of the plain phrases
    plain: re.Pattern | None
    gapped: dict[str, list[re.Pattern]]  # by anchor

    @classmethod
    def build(cls, phrases) -> _PhraseSet:
        plain, gapped, anchors = [], {}, set()
        for p in phrases:
            src, has_gap = _phrase_pattern(p)
            if has_gap:
                gapped.setdefault(_anchor(p), []).append(re.compile(_START + src + _END))
            else:
                plain.append(src)
                anchors.add(_anchor(p))
        # boundaries outside the alternation: tested once per position, not once per phrase
        combined = _START + "(?:" + "|".join(sorted(plain, key=len, reverse=True)) + ")" + _END if plain else None
        return cls(frozenset(anchors), re.compile(combined) if combined else None, gapped)

    def find(self, text: str, keys: set[str]) -> list[tuple[int, int, tuple]]:
        """(start, end, gap spans) of every match; `keys` is _sentence_keys(text)."""
        found = []
        if self.plain is not None and not self.anchors.isdisjoint(keys):
            found += [(m.start(), m.end(), ()) for m in self.plain.finditer(text)]
        for anchor in keys.intersection(self.gapped) if self.gapped else ():
            for rx in self.gapped[anchor]:
                for m in rx.finditer(text):
                    gaps = tuple(m.span(i) for i in range(1, rx.groups + 1) if m.group(i))
                    if not any(_CLAUSE_BREAK.search(text, a, b) for a, b in gaps):
                        found.append((m.start(), m.end(), gaps))
        return found


@dataclass
class _CompiledFinding:
    name: str
    synonyms: _PhraseSet
    negatives: _PhraseSet
    exclusions: _PhraseSet


@dataclass
class _CompiledVocabulary:
    findings: list[_CompiledFinding]
    by_anchor: dict[str, list[int]]  # first-word anchor -> findings with a synonym or negative phrase starting so

    def candidates(self, keys: set[str]) -> list[int]:
        return sorted({i for k in keys.intersection(self.by_anchor) for i in self.by_anchor[k]})


@lru_cache(maxsize=32)
def _compile(vocabulary: Vocabulary) -> _CompiledVocabulary:
    findings, by_anchor = [], {}
    for i, f in enumerate(vocabulary.findings):
        findings.append(_CompiledFinding(f.name, _PhraseSet.build(f.synonyms), _PhraseSet.build(f.negative_phrases),
                                         _PhraseSet.build(f.exclusions)))
        for phrase in f.synonyms + f.negative_phrases:
            by_anchor.setdefault(_anchor(phrase), []).append(i)
    return _CompiledVocabulary(findings, by_anchor)


# --- classification ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Mention:
    finding: int
    start: int
    end: int
    gaps: tuple[tuple[int, int], ...]
    negative_phrase: bool
    words: int


@dataclass(frozen=True)
class _Trigger:
    start: int
    end: int
    kind: str  # "neg_unc" | "neg" | "unc"
    role: str  # "pre" | "post"


def _triggers(sentence: str) -> list[_Trigger]:
    found = []
    for name, (rx, priority, role) in _TRIGGERS.items():
        for m in rx.finditer(sentence):
            found.append((priority, -(m.end() - m.start()), m.start(), m.end(), name, role))
    found.sort()
    kept: list[tuple[int, int, int, str, str]] = []
    for priority, _, start, end, name, role in found:
        # a trigger inside a higher-priority one is part of it ("not" in "cannot be excluded")
        if any(p < priority and s < end and start < e for p, s, e, _, _ in kept):
            continue
        kept.append((priority, start, end, name, role))
    return [_Trigger(s, e, n.split("_", 1)[1], r) for p, s, e, n, r in kept if n != "pseudo"]


def _clause(sentence: str, start: int, end: int) -> tuple[int, int]:
    lo, hi = 0, len(sentence)
    for m in _CLAUSE_BREAK.finditer(sentence):
        if m.end() <= start:
            lo = m.start() if m.group(0) != ";" else m.end()
        elif m.start() >= end:
            hi = m.start()
            break
    return lo, hi


def _n_words(text: str) -> int:
    return len(_WORD.findall(text))


def _classify(sentence: str, m: _Mention, triggers: list[_Trigger]) -> int:
    if m.negative_phrase:
        return NEGATIVE
    lo, hi = _clause(sentence, m.start, m.end)
    kinds = set()
    for t in triggers:
        if any(a <= t.start and t.end <= b for a, b in m.gaps):
            kinds.add(t.kind)
        elif t.role == "pre" and lo <= t.start and t.end <= m.start:
            between = sentence[t.end:m.start]
            # a verb right after the trigger is the negated verb itself ("does not appear to be X")
            block = _PRE_BLOCK.search(between, len(between) - len(between.lstrip()))
            if block is not None and block.start() == len(between) - len(between.lstrip()):
                block = _PRE_BLOCK.search(between, block.end())
            if _n_words(between) <= PRE_WINDOW and block is None:
                kinds.add(t.kind)
        elif t.role == "post" and m.end <= t.start and t.end <= hi:
            between = sentence[m.end:t.start]
            if _n_words(between) <= POST_WINDOW and not _POST_BLOCK.search(between):
                kinds.add(t.kind)
    if "neg_unc" in kinds:
        return UNCERTAIN
    if "neg" in kinds:
        return NEGATIVE
    if "unc" in kinds:
        return UNCERTAIN
    if re.match(r"\s*\?", sentence[m.end:]) or re.search(r"\?\s*$", sentence[lo:m.start]):
        return UNCERTAIN
    return POSITIVE


def _mentions(sentence: str, compiled: _CompiledVocabulary) -> list[_Mention]:
    mentions = []
    keys = _sentence_keys(sentence)
    for i in compiled.candidates(keys):
        cf = compiled.findings[i]
        found = [(hit, False) for hit in cf.synonyms.find(sentence, keys)]
        found += [(hit, True) for hit in cf.negatives.find(sentence, keys)]
        if not found:
            continue
        excluded = [(s, e) for s, e, _ in cf.exclusions.find(sentence, keys)]
        for (s, e, gaps), negative in found:
            # inside an exclusion, or overlapping one without containing it
            if any(s < xe and xs < e and not (s <= xs and xe <= e) for xs, xe in excluded):
                continue
            mentions.append(_Mention(i, s, e, gaps, negative, _n_words(sentence[s:e])))
    # "effusion" inside "pericardial effusion" is the longer finding's word
    return [m for m in mentions
            if not (m.words == 1 and not m.negative_phrase and any(
                o.finding != m.finding and not o.negative_phrase and o.start <= m.start and m.end <= o.end
                and (o.end - o.start) > (m.end - m.start) for o in mentions))]


def label_report(text: str, vocabulary: Vocabulary, unmentioned: int | None = 0) -> RuleLabels:
    """Label one report for every finding of `vocabulary` (1 present, 0 absent, -1 uncertain)."""
    compiled = _compile(vocabulary)
    best: dict[int, tuple[int, str]] = {}
    for _, sentence in split_sentences(text or ""):
        lowered = sentence.lower()
        mentions = _mentions(lowered, compiled)
        if not mentions:
            continue
        triggers = _triggers(lowered)
        for m in mentions:
            value = _classify(lowered, m, triggers)
            if m.finding not in best or _RANK[value] > _RANK[best[m.finding][0]]:
                best[m.finding] = (value, sentence)
    labels: dict[str, int | None] = {}
    evidence: dict[str, str] = {}
    for i, cf in enumerate(compiled.findings):
        if i in best:
            labels[cf.name] = best[i][0]
            if best[i][0] != NEGATIVE:
                evidence[cf.name] = best[i][1]
        else:
            labels[cf.name] = unmentioned
    for name, value in list(labels.items()):
        # lines and tubes: a device said to be malpositioned is present ("the PICC is too deep" names the PICC
        # only inside the malposition phrase, where the one-word device mention gives way to the longer one)
        device = name[: -len(" malpositioned")] if name.endswith(" malpositioned") else None
        if device in labels and value in (POSITIVE, UNCERTAIN) and labels[device] != POSITIVE:
            labels[device] = POSITIVE
            evidence[device] = evidence.get(name, "")
    for name in labels:
        if name.lower() == "no finding":
            abnormal = any(v in (POSITIVE, UNCERTAIN) for k, v in labels.items()
                           if k.lower() not in ("no finding", "support devices"))
            labels[name] = NEGATIVE if abnormal else POSITIVE
            evidence.pop(name, None)
    return RuleLabels(labels=labels, evidence=evidence)


def label_reports(texts, vocabulary: Vocabulary, unmentioned: int | None = 0) -> list[RuleLabels]:
    return [label_report(t, vocabulary, unmentioned) for t in texts]
