"""What Presidio's predefined recognizers miss, as plain regular expressions with validators.

Measured on a battery of realistic inputs (``tests/data/pii/``), Presidio's recognizers left
US social security numbers, passwords and tokens in assignments, e-mail addresses glued to
the next word, inside CJK text or spelled ``jane at example dot com``, card numbers written
with dots, lower-case IBANs, dates of birth, passport and national insurance numbers, MAC
addresses, street addresses and person names. :func:`find` finds those; the redactor adds
its matches to Presidio's and resolves overlaps the same way (higher score, then longer).

Structured values are matched by shape and checked where a checksum exists (Luhn for cards,
mod-97 for IBANs); a shape that is too common to mean anything on its own (nine digits, a
date, a word of six letters and digits) is taken only after a cue word ("SSN", "born on",
"passport no."), and only the value after the cue is replaced. Names and addresses have no
shape a regular expression can hold: these rules catch a name after "my name is", a
salutation or a sign-off, and an address that is a number and a street type ("221B Baker
Street", "Hauptstraße 5"). Anything else (a bare "John Smith" in a sentence) needs an NER
model (``traffic.person_names``). The recall of each class is printed by the battery's test.

Pure Python (``re``), no Presidio: cheap to import and to test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

EMAIL = "EMAIL_ADDRESS"
CARD = "CREDIT_CARD"
IBAN = "IBAN_CODE"
SECRET = "SECRET"
PERSON = "PERSON"
SSN = "US_SSN"
NATIONAL_ID = "NATIONAL_ID"
PASSPORT = "PASSPORT"
DATE_OF_BIRTH = "DATE_OF_BIRTH"
ADDRESS = "STREET_ADDRESS"
MAC = "MAC_ADDRESS"
SPELLED_NUMBER = "SPELLED_NUMBER"

# The classes these rules add to Presidio's (e-mail, cards, IBANs, secrets and names it has).
CLASSES: tuple[str, ...] = (SSN, NATIONAL_ID, PASSPORT, DATE_OF_BIRTH, ADDRESS, MAC, SPELLED_NUMBER)


@dataclass(frozen=True)
class Match:
    start: int
    end: int
    entity: str
    score: float


@dataclass(frozen=True)
class Rule:
    """``pattern``'s matches (or its group ``group``: the value after a cue) are ``entity``,
    when ``valid`` (if any) accepts the matched text."""

    name: str
    entity: str
    pattern: re.Pattern[str]
    score: float
    group: int = 0
    valid: Callable[[str], bool] | None = None


def _luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 12 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_shaped(text: str) -> bool:
    return 12 <= sum(c.isdigit() for c in text) <= 19


# IBAN lengths by country (ISO 13616), for the countries this is most likely to meet; others
# are checked by mod-97 alone within the standard's 15-34 characters.
_IBAN_LENGTH = {
    "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20,
    "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26,
    "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MT": 31, "NL": 18, "NO": 15, "PL": 28,
    "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "TR": 26,
}  # fmt: skip
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}")


def _mod97(compact: str) -> bool:
    moved = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in moved))
    except ValueError:
        return False
    return number % 97 == 1


def _ibans(text: str) -> Iterator[Match]:
    """IBANs in any case, compact or in groups: from each ``CCdd`` start, as many characters
    (single spaces or hyphens between them allowed) as the country's IBAN has, mod-97 checked."""
    for start in _IBAN_START.finditer(text):
        country = start.group()[:2].upper()
        lengths = [_IBAN_LENGTH[country]] if country in _IBAN_LENGTH else list(range(34, 14, -1))
        for length in lengths:
            chars: list[str] = []
            at = end = start.start()
            while at < len(text) and len(chars) < length:
                ch = text[at]
                if ch.isascii() and ch.isalnum():
                    chars.append(ch.upper())
                    end = at + 1
                elif ch in " -" and chars and at + 1 < len(text) and text[at + 1].isalnum():
                    pass
                else:
                    break
                at += 1
            glued = end < len(text) and text[end].isascii() and text[end].isalnum()
            if len(chars) == length and not glued and _mod97("".join(chars)):
                yield Match(start.start(), end, IBAN, 1.0)
                break


_MONTHS = (
    "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
    "oct(?:ober)?|nov(?:ember)?|dec(?:ember)?|januar|februar|märz|mai|juni|juli|oktober|dezember|"
    "enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|octubre|noviembre|diciembre|"
    "janvier|février|mars|avril|juin|juillet|août|septembre|octobre|novembre|décembre"
)
_DATE = (
    r"(?:\d{4}-\d{1,2}-\d{1,2}"
    r"|\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\.?\s+(?:of\s+|de\s+)?(?:{_MONTHS})\.?,?\s+(?:de\s+)?\d{{4}}"
    rf"|(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
)
_DIGIT_WORD = r"(?:zero|oh|one|two|three|four|five|six|seven|eight|nine)"
_TITLE = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Herr|Frau|Sr|Sra|Mme|Mlle|M)\.?"
# A capitalised word that is a name's part (O'Brien, Jean-Luc, Müller); at most three.
_NAME = r"[A-ZÀ-ÖØ-Þ](?:['\u2019][A-ZÀ-ÖØ-Þ])?[a-zß-öø-ÿ]+(?:-[A-ZÀ-ÖØ-Þ][a-zß-öø-ÿ]+)?"
_NAMES = rf"({_NAME}(?:\s+{_NAME}){{0,2}})"
# Capitalised words that follow a cue without being a name ("Hi Team", "I am Happy to").
_NOT_NAMES = frozenset(
    "I The A An My Our Your We You He She They It This That There Here Please Thanks Thank Team Support "
    "Customer Sir Madam All Everyone Again Sorry Hello Hi Dear Regards Best Cheers Good Morning Afternoon "
    "Evening Yes No Ok Okay Not Just Also Still Very So Happy Glad Sure Writing Looking Trying Going "
    "Order Account Service Sales Billing Admin Manager Mr Mrs Ms Miss Mx Dr Prof Herr Frau".split()
)
# USPS street suffixes (and the UK's usual ones), which a number and a capitalised name precede.
_STREET_TYPES = (
    "Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Close|"
    "Crescent|Square|Sq|Highway|Hwy|Parkway|Pkwy|Gardens?|Grove|Row|Mews|Alley|Bridge|Brook|Bypass|Canyon|"
    "Causeway|Circle|Cir|Cliffs?|Common|Corners?|Cove|Creek|Crest|Crossing|Dale|Estates?|Expressway|Falls|"
    "Ferry|Fields?|Forest|Fork|Fort|Freeway|Gateway|Glen|Green|Harbor|Harbour|Haven|Heights|Hills?|Hollow|"
    "Island|Junction|Knolls?|Lakes?|Landing|Loop|Manor|Meadows?|Mill|Mission|Mount|Mountain|Orchard|Oval|"
    "Park|Pass|Path|Pike|Pines?|Plaza|Point|Port|Ranch|Ridge|River|Route|Run|Shores?|Springs?|Station|"
    "Stravenue|Summit|Trace|Trail|Tunnel|Turnpike|Valley|View|Village|Ville|Vista|Walk|Wells?|Wharf|Yard"
)


def _not_a_common_word(text: str) -> bool:
    return text.split()[0] not in _NOT_NAMES


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


_I = re.IGNORECASE
RULES: tuple[Rule, ...] = (
    # -- e-mail addresses Presidio's word boundaries and suffix list let through -----------------
    Rule(
        "email_unbounded",  # glued to the next word, inside CJK text, or on a private domain
        EMAIL,
        re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,}"),
        0.95,
    ),
    Rule(
        "email_obfuscated",  # jane[at]example[dot]com, jane at example dot com
        EMAIL,
        re.compile(
            r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+"
            r"(?:\s*[\[({]at[\])}]\s*(?:[A-Za-z0-9\-]+\s*(?:[\[({]dot[\])}]|\.|\s+dot\s+)\s*)+"
            r"|\s+at\s+(?:[A-Za-z0-9\-]+\s+dot\s+)+)"
            r"(?:com|org|net|edu|gov|io|co|uk|de|fr|es|it|nl|info|biz|me|us|ca|au|in|jp|cn|ch|at|be)\b",
            _I,
        ),
        0.8,
    ),
    # -- cards and IBANs written in ways Presidio's patterns do not take --------------------------
    Rule(
        "card_separated",  # dots, or any mix of single separators, with a valid Luhn digit
        CARD,
        re.compile(
            r"(?<![\d.\-])\d{4}(?:[ .\-]\d{4}){2}[ .\-]\d{1,7}(?!\d)"
            r"|(?<![\d.\-])\d{4}[ .\-]\d{6}[ .\-]\d{5}(?!\d)"  # Amex: 4-6-5
        ),
        1.0,
        valid=_luhn,
    ),
    Rule(
        "card_after_cue",  # "card 4111 1111 1111 1112": a typo fails Luhn but is still a card number
        CARD,
        re.compile(
            r"(?i:\b(?:card|visa|mastercard|amex|credit|debit|cc|kreditkarte|karte|tarjeta|carte)\b)"
            r"[^\d\n]{0,20}?((?:\d[ .\-]?){11,18}\d)(?!\d)"
        ),
        0.7,
        group=1,
        valid=_card_shaped,
    ),
    # -- identity numbers ---------------------------------------------------------------------------
    Rule(
        "us_ssn_formatted",
        SSN,
        re.compile(r"(?<![\d\-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d\-])"),
        0.6,
    ),
    Rule(
        "us_ssn_after_cue",
        SSN,
        re.compile(
            r"(?i:\b(?:ssn|social security(?:\s+(?:number|no\.?|#))?|social(?:\s+(?:number|no\.?|#))?)"
            r"(?:\s+is)?\s*[:#\-]?\s*)(\d{3}[- ]?\d{2}[- ]?\d{4})(?!\d)"
        ),
        0.9,
        group=1,
    ),
    Rule(
        "uk_nino_after_cue",
        NATIONAL_ID,
        re.compile(
            r"(?i:\b(?:ni(?:\s+(?:number|no\.?))?|nino|national insurance(?:\s+(?:number|no\.?))?)"
            r"(?:\s+is)?\s*[:#\-]?\s*)([A-Za-z]{2}\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-Da-d])\b"
        ),
        0.9,
        group=1,
    ),
    Rule(
        "uk_nino",
        NATIONAL_ID,
        re.compile(
            r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b"
        ),
        0.6,
    ),
    Rule(
        "nhs_number_after_cue",
        NATIONAL_ID,
        re.compile(
            r"(?i:\bnhs(?:\s+(?:number|no\.?))?(?:\s+is)?\s*[:#\-]?\s*)(\d{3}[ \-]?\d{3}[ \-]?\d{4})(?!\d)"
        ),
        0.9,
        group=1,
    ),
    Rule(
        "passport_after_cue",
        PASSPORT,
        re.compile(
            r"(?i:\b(?:passport|reisepass|passeport|pasaporte|passaporto|paspoort)"
            r"(?:\s*(?:number|no\.?|nr\.?|num(?:ber|éro|ero)?|n[úu]mero|nummer|#))?(?:\s+is)?\s*[:#\-]?\s*)"
            r"([A-Za-z0-9]{6,10})\b"
        ),
        0.85,
        group=1,
        valid=_has_digit,
    ),
    Rule(
        "date_of_birth_after_cue",
        DATE_OF_BIRTH,
        re.compile(
            r"(?i:\b(?:dob|d\.o\.b\.?|date of birth|birth\s?date|birthday|born(?:\s+on)?|geboren(?:\s+am)?"
            r"|geburtsdatum|fecha de nacimiento|nacid[oa] el|née? le|date de naissance|data di nascita"
            r"|nat[oa] il)(?:\s+is)?\s*[:\-]?\s*)"
            rf"({_DATE})",
            _I,
        ),
        0.85,
        group=1,
    ),
    Rule(
        "mac_address",
        MAC,
        re.compile(
            r"(?<![0-9A-Fa-f:\-])(?:[0-9A-Fa-f]{2}([:\-]))(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}(?![0-9A-Fa-f:\-])"
        ),
        0.7,
    ),
    Rule(
        "spelled_digits",  # a number read out: "four one one one ..."
        SPELLED_NUMBER,
        re.compile(rf"\b{_DIGIT_WORD}(?:[\s,\-]+{_DIGIT_WORD}){{3,}}\b", _I),
        0.6,
    ),
    # -- secrets in assignments: the value after password=, "token": ... ---------------------------
    Rule(
        "secret_assignment",
        SECRET,
        re.compile(
            r"(?i:(?<![A-Za-z0-9])[\"']?[A-Za-z0-9_.\-]*"
            r"(?:password|passwd|passphrase|pwd|secret|token|api[_\-]?key|apikey|private[_\-]?key[_\-]?id|access[_\-]?key)"
            r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;]{4,})"
        ),
        0.85,
        group=1,
    ),
    Rule(
        "password_in_url",
        SECRET,
        re.compile(r"(?i:\b[a-z][a-z0-9+.\-]*://[^\s:/@]+:)([^\s@/]+)(?=@)"),
        0.9,
        group=1,
    ),
    # -- names and addresses: what patterns can hold ------------------------------------------------
    Rule(
        "name_after_cue",
        PERSON,
        re.compile(
            r"(?:(?i:\b(?:my name is|my name's|name is|name:|i am|i'm|call me|this is|signed|"
            r"my (?:husband|wife|partner|son|daughter|mother|father|brother|sister|friend|colleague|manager)"
            r"(?:'s name)? is|je m'appelle|me llamo|ich heiße|ich bin|mi chiamo))\s+)" + _NAMES
        ),
        0.6,
        group=1,
        valid=_not_a_common_word,
    ),
    Rule(
        "name_after_salutation",
        PERSON,
        re.compile(
            r"(?:\b(?:Dear|Hi|Hello|Hey|Bonjour|Hola|Hallo|Liebe[rs]?|Sehr geehrte[rs]?)\s+"
            rf"(?:{_TITLE}\s+)?|\b{_TITLE}\s+)" + _NAMES
        ),
        0.6,
        group=1,
        valid=_not_a_common_word,
    ),
    Rule(
        "name_in_sign_off",
        PERSON,
        re.compile(
            r"(?:\b(?:Regards|Best regards|Kind regards|Best|Cheers|Thanks|Thank you|Sincerely|Yours|"
            r"Mit freundlichen Grüßen|Cordialement|Saludos|Atentamente),?\s*\n\s*)" + _NAMES
        ),
        0.6,
        group=1,
        valid=_not_a_common_word,
    ),
    Rule(
        "street_number_first",  # 1600 Pennsylvania Avenue, 221B Baker Street
        ADDRESS,
        re.compile(
            rf"\b\d{{1,5}}[A-Za-z]?,?\s+(?:[A-Z][A-Za-z'.\-]*\s+){{1,3}}(?:{_STREET_TYPES})\b\.?"
            r"(?:,?\s+(?:Apt|Suite|Unit|Flat)\.?\s*#?\d+[A-Za-z]?)?"
        ),
        0.6,
    ),
    Rule(
        "street_number_after",  # Hauptstraße 5, Calle Mayor 12, Via Roma 3
        ADDRESS,
        re.compile(
            r"\b(?:[A-ZÄÖÜ][\wäöüß\-]*(?i:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer"
            r"|straat|laan|plein|gracht|kade|steeg|singel|dijk|dreef|hof|boulevard)"
            r"|(?:Calle|Avenida|Av\.|Plaza|Paseo|Camino|Cañada|Pasaje|Acceso|Ronda|Travesía|Carrera|Glorieta"
            r"|Via|Viale|Piazza|Corso|Vicolo|Contrada|Incrocio|Borgo|Strada|Rue|Boulevard|Straat|Laan)"
            r"(?:\s+(?:de|del|la|las|los|di|della|des|du|van|der)?\s*[A-ZÀ-Þ][\wà-ÿ'\-]*){1,3}),?\s+\d{1,4}[a-z]?\b"
        ),
        0.6,
    ),
    Rule(
        "rue_number_first",  # 12 rue de la Paix
        ADDRESS,
        re.compile(
            r"\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?i:rue|avenue|boulevard|bd|place|chemin|allée|impasse|quai)"
            r"(?:\s+(?:(?:de|du|des|la|le|les|l'|d')\s*)*[A-ZÀ-Þ][\wà-ÿ'\-]*){1,4}"
        ),
        0.6,
    ),
)


def find(text: str) -> list[Match]:
    """Every match of :data:`RULES` (and IBANs in any case) in ``text``; overlaps are left to
    the caller, which resolves them with Presidio's."""
    found: list[Match] = list(_ibans(text))
    for rule in RULES:
        for m in rule.pattern.finditer(text):
            start, end = m.span(rule.group)
            if start < 0 or end <= start:
                continue
            if rule.valid is not None and not rule.valid(text[start:end]):
                continue
            found.append(Match(start, end, rule.entity, rule.score))
    return found
