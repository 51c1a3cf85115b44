"""PII redaction of sampled traffic: Presidio recognizers, offline, with keyed pseudonyms.

Why Presidio. Its recognizers carry the validation that keeps false positives low: card
numbers must pass the Luhn check, IBANs their mod-97 checksum and country format, phone
numbers are parsed and validated by ``phonenumbers``, IP addresses by :mod:`ipaddress`,
e-mail domains against the public suffix list. Secrets and API tokens are one more
:class:`~presidio_analyzer.PatternRecognizer` (``SECRET``): OpenAI, GitHub, AWS, Slack and
Google keys, JWTs, PEM private keys, ``Bearer`` values and loraflow's own API keys.

Offline. Nothing here touches the network, ever:

* The NLP engine is a *blank* spaCy English pipeline (a tokenizer, no model to download),
  written once to ``cache_dir/spacy-blank-en`` and loaded from there; Presidio's
  recognizers here are regular expressions plus checksums and need no NER, nor even the
  tokens, so without person names the pipeline is not run at all (empty NLP artifacts).
* Presidio's ``EmailRecognizer`` validates domains with ``tldextract.extract``, which
  downloads the public suffix list on first use; :class:`_OfflineEmailRecognizer` uses
  a ``TLDExtract`` limited to the snapshot bundled with tldextract.
* Presidio probes for a GPU when it is imported (allocating on it when torch sees one)
  and would move spaCy onto it; ``PRESIDIO_DEVICE`` defaults to ``cpu`` here and the
  spaCy engine skips its GPU switch, so redaction stays on the CPU.

Keyed pseudonyms. Each value found becomes ``<CLASS_xxxxxxxxxxxx>``: the first 12 hex
digits of HMAC-SHA256(key, ``CLASS:normalized value``). The same e-mail address gives the
same placeholder in every record, so records can still be joined and counted by it, but
without the key nobody can test a guess (a plain hash of an e-mail address or a card
number is easy to reverse by enumeration). Values are normalized first so spellings of
one value agree: e-mail lower-cased, phone and card numbers digits only, IBANs upper-case
without spaces. Text inside a placeholder is never redacted again, so redacting twice
changes nothing (this needs enforcing: about one placeholder in 280 has 12 decimal digits,
which the phone matcher can take for a number).

Person names are optional (``person_names=True``): they need a real NER model, named by
``traffic.spacy_model`` and installed beforehand (``python -m spacy download ...``), and
they are slower and less precise than the checks above. Presidio is imported only when a
:class:`Redactor` is built (it imports torch and transformers when they are installed,
which takes seconds), so importing this module is cheap.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.registry import pii_patterns
from loraflow.registry.errors import InvalidArgumentError, MissingDependencyError
from loraflow.registry.keys import KEY_PREFIX
from loraflow.registry.secrets import home_secret

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerResult
    from presidio_analyzer.nlp_engine import NlpArtifacts

    from loraflow.registry.settings import Settings

EMAIL = "EMAIL_ADDRESS"
PHONE = "PHONE_NUMBER"
CARD = "CREDIT_CARD"
IBAN = "IBAN_CODE"
IP = "IP_ADDRESS"
SECRET = "SECRET"
PERSON = "PERSON"

DATA_URI = "DATA_URI"
TOKEN_IDS = "TOKEN_IDS"

# Always on: Presidio's checked classes, the pattern classes of pii_patterns (names by pattern
# among them), and what the walk replaces whole (inline files, prompts given as token ids).
CLASSES: tuple[str, ...] = (
    EMAIL,
    PHONE,
    CARD,
    IBAN,
    IP,
    SECRET,
    PERSON,
    *pii_patterns.CLASSES,
    DATA_URI,
    TOKEN_IDS,
)
# Phone regions parsed besides Presidio's defaults (US, GB, DE, FR, IL, IN, CA, BR): each is one
# more pass of ``phonenumbers`` over text with enough digits.
EXTRA_PHONE_REGIONS = ("ES", "IT", "NL", "AU", "JP", "CN", "MX")

# Presidio scores: phone numbers 0.4 (parsed and valid, no context), IP addresses 0.6,
# e-mail, cards and IBANs 1.0 once validated, secrets 0.9-1.0, person names 0.85. The
# threshold keeps all of those and drops Presidio's 0.1 guess that a bare "::" is an IPv6
# address.
SCORE_THRESHOLD = 0.35

PLACEHOLDER_HEX_DIGITS = 12
# What a placeholder looks like; text inside one is never redacted again.
PLACEHOLDER = re.compile(rf"<[A-Z][A-Z_]*_[0-9a-f]{{{PLACEHOLDER_HEX_DIGITS}}}>")

BLANK_PIPELINE = "spacy-blank-en"
# Texts up to this long are remembered (LRU): system prompts, roles and model names recur in
# nearly every record, and their redaction is the same every time.
CACHE_MAX_CHARS = 4096
CACHE_ENTRIES = 2048
_DIGIT = re.compile(r"\d")
# spaCy refuses longer texts; the blank pipeline only tokenizes, so a large limit is cheap.
BLANK_MAX_LENGTH = 10_000_000

_INSTALL_TRAFFIC = "pip install 'loraflow[traffic]'"

# Characters of the usual token alphabets; a secret must not start in the middle of a word.
_T = r"A-Za-z0-9_\-"
_START = rf"(?<![{_T}])"

# (name, regex, score). Compiled by Presidio with the `regex` module, case-sensitive.
SECRET_PATTERNS: tuple[tuple[str, str, float], ...] = (
    # OpenAI: sk-..., sk-proj-..., sk-svcacct-..., sk-admin-...; at least 20 characters
    # and a digit, so hyphenated prose that starts with "sk-" is left alone.
    (
        "openai_key",
        rf"{_START}sk-(?:(?:proj|svcacct|admin)-)?(?=[{_T}]{{20}})(?=[A-Za-z_\-]*[0-9])[{_T}]+",
        0.9,
    ),
    ("github_token", rf"{_START}(?:gh[pousr]_[A-Za-z0-9]{{36,}}|github_pat_[A-Za-z0-9_]{{40,}})", 0.9),
    ("aws_access_key_id", r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])", 0.9),
    ("slack_token", rf"{_START}xox[abprs]-(?=[A-Za-z\-]*[0-9])[A-Za-z0-9\-]{{10,}}", 0.9),
    ("google_api_key", rf"{_START}AIza[0-9A-Za-z_\-]{{35}}(?![{_T}])", 0.9),
    ("jwt", rf"{_START}eyJ[{_T}]{{5,}}\.eyJ[{_T}]{{5,}}\.[{_T}]*", 0.9),
    (
        "pem_private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
        1.0,
    ),
    # A block cut off before its END line: the header and the base64 lines after it.
    (
        "pem_private_key_truncated",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        r"(?:(?:\r?\n|\\n)(?:[A-Za-z0-9+/=]+|Proc-Type:[^\r\n]*|DEK-Info:[^\r\n]*))*",
        0.95,
    ),
    # The value after "Bearer " (the word stays); 16+ characters with a digit, so prose
    # such as "the bearer of this letter" is left alone.
    (
        "bearer_token",
        r"(?<=(?i:\bbearer)[ \t]+)(?=[A-Za-z\-._~+/]*[0-9])[A-Za-z0-9\-._~+/]{16,}=*",
        0.9,
    ),
    # loraflow's own API keys (registry/keys.py): the prefix and token_urlsafe(32).
    ("loraflow_api_key", rf"{_START}{re.escape(KEY_PREFIX)}[{_T}]{{40,}}", 0.9),
    ("stripe_key", rf"{_START}(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{{10,}}", 0.9),
    ("huggingface_token", rf"{_START}hf_[A-Za-z0-9]{{30,}}", 0.9),
    ("gitlab_token", rf"{_START}gl(?:pat|dt|ptt|rt)-[A-Za-z0-9_\-]{{20,}}", 0.9),
    ("slack_webhook", r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_\-]+", 0.95),
)
# An inline file: the whole data URI is one value (an image, a PDF a user uploaded).
_DATA_URI = re.compile(r"data:[\w.+\-]+/[\w.+\-]+(?:;[\w\-]+=[\w\-]+)*;base64,[A-Za-z0-9+/=\s]+")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Redacted:
    """A redacted text and how many values of each class were replaced in it (do not mutate:
    the redactor hands the same object out again for the same text)."""

    text: str
    found: dict[str, int]
    # Names found where a cue marks them ("my name is ..."): the record's other mentions of them,
    # which have no cue ("Noted, Jane Doe."), are replaced too (Redactor.redact_value).
    names: tuple[str, ...] = ()


def normalize(entity: str, value: str) -> str:
    """The form of a value that its pseudonym is computed from: spellings of one value agree."""
    if entity == EMAIL:
        return value.strip().lower()
    if entity in (PHONE, CARD):
        return "".join(ch for ch in value if ch.isdigit())
    if entity == IBAN:
        return "".join(value.split()).replace("-", "").upper()
    if entity == PERSON:
        return " ".join(value.split())
    return value


def placeholder(key: bytes, entity: str, value: str) -> str:
    """``<ENTITY_xxxxxxxxxxxx>``: HMAC-SHA256 of the normalized value under ``key``, so the same
    for the same value and key, and not computable without the key."""
    message = f"{entity}:{normalize(entity, value)}".encode()
    digest = hmac.new(key, message, hashlib.sha256).hexdigest()
    return f"<{entity}_{digest[:PLACEHOLDER_HEX_DIGITS]}>"


class Redactor:
    """Replaces PII and secrets in text with keyed pseudonyms (see the module docstring).

    Building one loads Presidio and spaCy (seconds); build it once and reuse it. It keeps no
    state between calls. Raises :class:`MissingDependencyError` when Presidio is not
    installed, or when ``person_names`` is asked for without an installed NER model."""

    def __init__(
        self,
        *,
        key: bytes,
        cache_dir: Path,
        person_names: bool = False,
        spacy_model: str | None = None,
    ) -> None:
        if not key:
            raise InvalidArgumentError("the pseudonym key must not be empty", param="traffic.pseudonym_key")
        self._key = bytes(key)
        self.person_names = person_names
        self.classes: tuple[str, ...] = CLASSES + ((PERSON,) if person_names else ())
        self._analyzer, self._no_nlp = _build_analyzer(
            cache_dir=Path(cache_dir), person_names=person_names, spacy_model=spacy_model
        )
        self._remembered = functools.lru_cache(maxsize=CACHE_ENTRIES)(self._redact)

    def placeholder(self, entity: str, value: str) -> str:
        """What ``value`` of class ``entity`` is replaced with, under this redactor's key."""
        return placeholder(self._key, entity, value)

    def redact(self, text: str) -> Redacted:
        if not text:
            return Redacted(text, {})
        if len(text) <= CACHE_MAX_CHARS:
            return self._remembered(text)
        return self._redact(text)

    def _redact(self, text: str) -> Redacted:
        # Analysed in a normalized form (NFKC: full-width digits, no-break and other odd spaces),
        # replaced in the text as written: each normalized character maps back to its source.
        seen, source = _normalized(text)
        results = [
            (r.start, r.end, r.entity_type, r.score)
            for r in self._analyzer.analyze(
                text=seen, language="en", score_threshold=SCORE_THRESHOLD, nlp_artifacts=self._no_nlp
            )
        ]
        results += [(m.start, m.end, m.entity, m.score) for m in pii_patterns.find(seen)]
        # Text inside a placeholder is taken already: redacting twice changes nothing.
        taken = _Spans(m.span() for m in PLACEHOLDER.finditer(text))
        spans: list[tuple[int, int, str]] = []
        # Overlaps: the higher score wins, then the longer span, then the earlier one.
        for start, end, entity, _ in sorted(results, key=lambda r: (-r[3], -(r[1] - r[0]), r[0])):
            if entity not in self.classes or end <= start:
                continue
            start, end = source[start], source[end - 1] + 1
            if taken.add(start, end):
                spans.append((start, end, entity))
        if not spans:
            return Redacted(text, {})
        found: Counter[str] = Counter()
        parts: list[str] = []
        names: list[str] = []
        at = 0
        for start, end, entity in sorted(spans):
            parts.append(text[at:start])
            parts.append(self.placeholder(entity, text[start:end]))
            found[entity] += 1
            if entity == PERSON:
                names.append(text[start:end])
            at = end
        parts.append(text[at:])
        return Redacted("".join(parts), dict(found), tuple(names))

    def redact_value(self, value: object) -> tuple[object, Counter[str]]:
        """Redacts every string in a JSON-like value (dicts, lists, tuples, strings), dict keys
        included (a tool's schema can name a property after an e-mail address). A data URI (an
        inline file) and a prompt given as token ids are replaced whole: neither can be read
        for PII. Other values (numbers, booleans, None) are kept as they are."""
        found: Counter[str] = Counter()
        names: set[str] = set()
        out = self._walk(value, found, names)
        if names:  # a name found after a cue, mentioned again without one elsewhere in the value
            mention = re.compile(
                "|".join(rf"\b{re.escape(n)}\b" for n in sorted(names, key=len, reverse=True))
            )
            out = self._spread(out, mention, found)
        return out, found

    def _spread(self, value: object, mention: re.Pattern[str], found: Counter[str]) -> object:
        if isinstance(value, str):
            return mention.sub(lambda m: self._whole(PERSON, m.group(), found), value)
        if isinstance(value, dict):
            return {
                self._spread(k, mention, found): self._spread(v, mention, found) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            spread = [self._spread(v, mention, found) for v in value]
            return spread if isinstance(value, list) else tuple(spread)
        return value

    def _walk(self, value: object, found: Counter[str], names: set[str], key: object = None) -> object:
        if isinstance(value, str):
            if _DATA_URI.search(value):
                value = _DATA_URI.sub(lambda m: self._whole(DATA_URI, m.group(), found), value)
            redacted = self.redact(value)
            found.update(redacted.found)
            names.update(redacted.names)
            return redacted.text
        if key == "prompt" and _token_ids(value):
            return self._whole(TOKEN_IDS, json.dumps(value), found)
        if isinstance(value, dict):
            return {self._walk(k, found, names): self._walk(v, found, names, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v, found, names) for v in value]
        if isinstance(value, tuple):
            return tuple(self._walk(v, found, names) for v in value)
        return value

    def _whole(self, entity: str, value: str, found: Counter[str]) -> str:
        found[entity] += 1
        return self.placeholder(entity, value)


def _token_ids(value: object) -> bool:
    """A completion prompt given as token ids: a list of ints, or a list of such lists."""
    if not isinstance(value, list) or not value:
        return False
    rows = value if all(isinstance(v, list) for v in value) else [value]
    return all(isinstance(t, int) and not isinstance(t, bool) for row in rows for t in row)


def _normalized(text: str) -> tuple[str, list[int]]:
    """``text`` in NFKC (full-width digits and letters as ASCII, no-break and other Unicode
    spaces as spaces) and, per character of the result, the index of the character of ``text``
    it came from; a character that becomes several maps each of them back to itself."""
    if text.isascii():
        return text, list(range(len(text)))
    out: list[str] = []
    source: list[int] = []
    for i, ch in enumerate(text):
        n = unicodedata.normalize("NFKC", ch) if not ch.isascii() else ch
        if not n:
            continue
        out.append(n)
        source.extend([i] * len(n))
    return "".join(out), source


class _Spans:
    """Disjoint half-open spans, kept sorted: adding one costs a binary search, not a scan."""

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in spans:
            self.add(start, end)

    def add(self, start: int, end: int) -> bool:
        """Adds [start, end) unless it overlaps a span already there; says whether it did."""
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] < end:
            return False
        if i > 0 and self._ends[i - 1] > start:
            return False
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        return True


def _build_analyzer(
    *, cache_dir: Path, person_names: bool, spacy_model: str | None
) -> tuple[AnalyzerEngine, NlpArtifacts | None]:
    """Presidio's analyzer with loraflow's recognizers, and, without person names, the empty
    NLP artifacts to hand it: then no recognizer reads tokens (they are regular expressions,
    checksums and ``phonenumbers``, and the context enhancer is off), so running even a
    blank spaCy pipeline over each text (a seventh of the time) is skipped."""
    _quiet_presidio()
    # Importing presidio_analyzer runs its device probe, which allocates on a CUDA device
    # when torch sees one: a CUDA context in the gateway, taken from the engines' memory.
    # An operator's own PRESIDIO_DEVICE is kept.
    os.environ.setdefault("PRESIDIO_DEVICE", "cpu")
    try:
        import phonenumbers
        import spacy
        import spacy.util
        import tldextract
        from presidio_analyzer import (
            AnalyzerEngine,
            EntityRecognizer,
            Pattern,
            PatternRecognizer,
            RecognizerRegistry,
            RecognizerResult,
        )
        from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
        from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngineProvider, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            SpacyRecognizer,
        )
    except ImportError as exc:
        raise MissingDependencyError(
            f"redacting sampled traffic needs presidio-analyzer and spaCy ({exc}): {_INSTALL_TRAFFIC}"
        ) from exc

    if person_names:
        if not spacy_model:
            raise MissingDependencyError(
                "traffic.person_names needs a spaCy pipeline with NER: set traffic.spacy_model "
                "(e.g. en_core_web_lg) and install it with `python -m spacy download en_core_web_lg`",
                param="traffic.spacy_model",
            )
        if not (spacy.util.is_package(spacy_model) or (Path(spacy_model) / "config.cfg").is_file()):
            # Presidio would try to download it at run time; refuse instead.
            raise MissingDependencyError(
                f"the spaCy model {spacy_model!r} (traffic.spacy_model) is not installed: install it "
                f"with `python -m spacy download {spacy_model}`, or set traffic.spacy_model to an "
                "installed spaCy pipeline with NER, or switch traffic.person_names off",
                param="traffic.spacy_model",
            )
        model_name = spacy_model
    else:
        model_name = str(_blank_pipeline(cache_dir))

    class _CpuSpacyNlpEngine(SpacyNlpEngine):
        """Presidio's spaCy engine without its GPU probe (which allocates on any CUDA device
        that torch sees): a tokenizer or a small NER model has no use for a GPU."""

        def _enable_gpu(self) -> None:
            pass

    class _OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's recognizer, validating domains against tldextract's bundled snapshot of
        the public suffix list instead of downloading it."""

        def __init__(self) -> None:
            super().__init__()
            self._tld = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)
            self._tld("example.com")  # load the snapshot now, not on the first record

        def validate_result(self, pattern_text: str) -> bool:
            return self._tld(pattern_text).fqdn != ""

    class _NoContextEnhancer(ContextAwareEnhancer):
        """Presidio's default enhancer raises scores when words such as "phone" stand near a
        match. It compares lemmas, which a blank pipeline does not have, and costs time in
        the number of matches times the number of tokens (tens of seconds for 100 kB with
        a thousand matches). The threshold here needs no boost."""

        def __init__(self) -> None:
            super().__init__(
                context_similarity_factor=0.0,
                min_score_with_context_similarity=0.0,
                context_prefix_count=0,
                context_suffix_count=0,
            )

        def enhance_using_context(
            self,
            text: str,
            raw_results: list[RecognizerResult],
            nlp_artifacts: NlpArtifacts,
            recognizers: list[EntityRecognizer],
            context: list[str] | None = None,
        ) -> list[RecognizerResult]:
            return raw_results

    nlp_engine = NlpEngineProvider(
        nlp_engines=(_CpuSpacyNlpEngine,),
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": model_name}],
        },
    ).create_engine()
    pipeline = nlp_engine.nlp["en"] if isinstance(nlp_engine, SpacyNlpEngine) and nlp_engine.nlp else None
    if person_names and (pipeline is None or "ner" not in pipeline.pipe_names):
        raise MissingDependencyError(
            f"the spaCy pipeline {spacy_model!r} (traffic.spacy_model) has no NER component, so it "
            "cannot find person names: set traffic.spacy_model to one that has (e.g. en_core_web_lg, "
            "installed with `python -m spacy download en_core_web_lg`)",
            param="traffic.spacy_model",
        )
    if not person_names and pipeline is not None:
        pipeline.max_length = BLANK_MAX_LENGTH

    class _DigitGatedPhoneRecognizer(PhoneRecognizer):
        """Presidio's recognizer, skipped for text with fewer digits than the shortest valid
        number of any region has. It is the costliest recognizer by far (``phonenumbers``
        parses each candidate once per supported region), and most text has few digits."""

        def __init__(self) -> None:
            self._leniency: int = phonenumbers.Leniency.VALID  # Presidio's default, 1
            regions = (*PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS, *EXTRA_PHONE_REGIONS)
            super().__init__(leniency=self._leniency, supported_regions=tuple(dict.fromkeys(regions)))
            self._min_digits = _shortest_phone_number()

        def analyze(
            self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
        ) -> list[RecognizerResult]:
            # \d is any Unicode digit, as phonenumbers reads them; stop counting at enough.
            if sum(1 for _ in itertools.islice(_DIGIT.finditer(text), self._min_digits)) < self._min_digits:
                return []
            # Presidio's loop, less its second parse of every match (without a region, which
            # raises for a national number) that only names the region in the explanation. The
            # analyzer adds the recognizer's name and id to each result.
            results = [
                RecognizerResult(entity_type=PHONE, start=match.start, end=match.end, score=self.SCORE)
                for region in self.supported_regions
                for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=self._leniency)
            ]
            return EntityRecognizer.remove_duplicates(results)

    recognizers: list[EntityRecognizer] = [
        _OfflineEmailRecognizer(),
        _DigitGatedPhoneRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
        IpRecognizer(),
        PatternRecognizer(
            supported_entity=SECRET,
            name="SecretRecognizer",
            patterns=[Pattern(name, regex, score) for name, regex, score in SECRET_PATTERNS],
            global_regex_flags=re.DOTALL | re.MULTILINE,
        ),
    ]
    if person_names:
        recognizers.append(SpacyRecognizer(supported_language="en", supported_entities=[PERSON]))
    analyzer = AnalyzerEngine(
        registry=RecognizerRegistry(recognizers=recognizers, supported_languages=["en"]),
        nlp_engine=nlp_engine,
        supported_languages=["en"],
        default_score_threshold=SCORE_THRESHOLD,
        context_aware_enhancer=_NoContextEnhancer(),
    )
    if person_names or pipeline is None:
        return analyzer, None
    empty = NlpArtifacts(
        entities=[],
        tokens=pipeline.make_doc(""),
        tokens_indices=[],
        lemmas=[],
        nlp_engine=None,
        language="en",
    )
    return analyzer, empty


def _shortest_phone_number() -> int:
    """The fewest digits a valid phone number has, in any region's metadata (4: a few regions)."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    regions = [PhoneMetadata.metadata_for_region(r) for r in phonenumbers.SUPPORTED_REGIONS]
    regions += [
        PhoneMetadata.metadata_for_nongeo_region(c) for c in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS
    ]
    return min(min(d.possible_length) for m in regions if m and (d := m.general_desc) and d.possible_length)


def _quiet_presidio() -> None:
    """Presidio logs at INFO on every call ("Fetching all recognizers ...") and at DEBUG the
    words around each match; neither belongs in the gateway's log. Left alone where the
    operator set the logger's level."""
    presidio_log = logging.getLogger("presidio-analyzer")
    if presidio_log.level == logging.NOTSET:
        presidio_log.setLevel(logging.WARNING)


def _blank_pipeline(cache_dir: Path) -> Path:
    """``cache_dir/spacy-blank-en``: a blank English spaCy pipeline, written once.

    It is written to a temporary folder beside it and renamed into place, so a concurrent
    process sees either no folder or a whole one; the loser of a race discards its copy.
    A copy written by another spaCy release (that this one would warn about) is replaced."""
    import spacy
    import spacy.about
    import spacy.util

    path = cache_dir / BLANK_PIPELINE
    if _is_current(path, spacy.about.__version__):
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BLANK_PIPELINE}.", dir=cache_dir))
    stale = tmp.with_name(tmp.name + ".stale")
    try:
        spacy.blank("en").to_disk(tmp)
        if path.exists():
            with contextlib.suppress(OSError):  # another process moved it first
                path.rename(stale)
        try:
            tmp.replace(path)
            log.info("wrote a blank spaCy pipeline to %s", path)
        except OSError:
            if not _is_current(path, spacy.about.__version__):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return path


def _is_current(path: Path, spacy_version: str) -> bool:
    import spacy.util

    try:
        meta: Any = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if not (path / "config.cfg").is_file() or not isinstance(meta, dict):
        return False
    constraint = meta.get("spacy_version")
    return isinstance(constraint, str) and bool(spacy.util.is_compatible_version(spacy_version, constraint))


def pseudonym_key(settings: Settings) -> bytes:
    """``traffic.pseudonym_key``, else a random key made once in ``$home/secrets/pseudonym.key`` (0600)."""
    if settings.traffic.pseudonym_key is not None:
        return settings.traffic.pseudonym_key.get_secret_value().encode()
    return home_secret(settings.home, "pseudonym.key")


def redactor_from_settings(settings: Settings) -> Redactor:
    return Redactor(
        key=pseudonym_key(settings),
        cache_dir=settings.home / "cache",
        person_names=settings.traffic.person_names,
        spacy_model=settings.traffic.spacy_model,
    )
