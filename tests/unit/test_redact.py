from __future__ import annotations

import hashlib
import hmac
import json
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loraflow.registry import redact
from loraflow.registry.errors import MissingDependencyError
from loraflow.registry.keys import KEY_PREFIX
from loraflow.registry.redact import PLACEHOLDER, Redacted, Redactor, placeholder

pytestmark = pytest.mark.unit

KEY = b"test-pseudonym-key"


@contextmanager
def no_network() -> Iterator[list[str]]:
    """Every attempt to resolve a name or open a connection is recorded and refused. Recorded,
    not only refused: libraries such as tldextract swallow a failed fetch and fall back."""
    attempts: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: object, **kwargs: object) -> Any:
            attempts.append(f"{name}{args[:2]!r}")
            raise OSError(f"network disabled in this test: {name}")

        return refused

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        mp.setattr(socket, "create_connection", refuse("create_connection"))
        mp.setattr(socket.socket, "connect", refuse("connect"))
        mp.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
        yield attempts


@dataclass
class Built:
    redactor: Redactor
    cache_dir: Path
    attempts: list[str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    # The one Redactor of this module, built (presidio imported, blank pipeline written,
    # e-mail validation warmed up) with the network switched off.
    cache_dir = tmp_path_factory.mktemp("redact-cache")
    with no_network() as attempts:
        redactor = Redactor(key=KEY, cache_dir=cache_dir)
        redactor.redact("warm up: someone@example.com, +1 415-555-0132")
    return Built(redactor, cache_dir, attempts)


@pytest.fixture
def redactor(built: Built) -> Redactor:
    return built.redactor


def assert_redacted(redactor: Redactor, value: str, entity: str) -> None:
    text = f"before {value} after"
    out = redactor.redact(text)
    assert value not in out.text, out
    expected = redactor.placeholder(entity, value)
    assert out.text == f"before {expected} after", out
    assert out.found == {entity: 1}


def luhn_ok(number: str) -> bool:
    digits = [int(d) for d in number if d.isdigit()]
    total = sum(digits[-1::-2]) + sum(sum(divmod(2 * d, 10)) for d in digits[-2::-2])
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


# --- each class: found, and replaced by its own placeholder --------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "john.doe@example.com",
        "John.Doe+tag@Sub.Example.co.uk",
        "a_b-c@my-domain.io",
        "x@example.museum",
        "ops@foo.dev",
    ],
)
def test_email(redactor: Redactor, value: str) -> None:
    assert_redacted(redactor, value, "EMAIL_ADDRESS")


@pytest.mark.parametrize(
    "value",
    [
        "+1 415-555-0132",
        "(415) 555-0132",
        "415.555.0132",
        "+44 20 7946 0958",
        "020 7946 0958",
        "+49 30 901820",
        "+33 1 42 68 53 00",
        "030 1234",  # a German number with the fewest digits a valid number has (4 after the 0)
        "+683 7012",  # Niue: a 4-digit national number
        "\uff14\uff11\uff15 \uff15\uff15\uff15 \uff10\uff11\uff13\uff14",  # full-width digits count too
    ],
)
def test_phone(redactor: Redactor, value: str) -> None:
    assert_redacted(redactor, value, "PHONE_NUMBER")


@pytest.mark.parametrize(
    "value",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "5500 0000 0000 0004",
        "5105105105105100",
        "6011111111111117",
        "3782 822463 10005",
    ],
)
def test_card(redactor: Redactor, value: str) -> None:
    assert luhn_ok(value)
    assert_redacted(redactor, value, "CREDIT_CARD")


@pytest.mark.parametrize(
    "value",
    [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82 WEST 1234 5698 7654 32",
        "GB33BUKB20201555555555",
        "FR14 2004 1010 0505 0001 3M02 606",
        "FR7630006000011234567890189",
    ],
)
def test_iban(redactor: Redactor, value: str) -> None:
    assert iban_ok(value)
    assert_redacted(redactor, value, "IBAN_CODE")


@pytest.mark.parametrize(
    "value",
    [
        "192.168.1.20",
        "10.0.0.1",
        "8.8.8.8",
        "2001:db8::1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "fe80::1ff:fe23:4567:890a",
    ],
)
def test_ip(redactor: Redactor, value: str) -> None:
    assert_redacted(redactor, value, "IP_ADDRESS")


PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA PRIVATE KEY-----"
)

SECRETS = {
    "openai": "sk-abc123def456ghi789jkl012mno345",
    "openai_project": "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z_-Q7",
    "github_ghp": "ghp_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6",
    "github_gho": "gho_16C7e42F292c6912E7710c838347Ae178B4a",
    "github_ghs": "ghs_16C7e42F292c6912E7710c838347Ae178B4a",
    "github_pat": "github_pat_11ABCDEFG0123456789abc_" + "x9" * 29 + "z",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "slack": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "google": "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "pem": PEM,
    "loraflow_key": KEY_PREFIX + "Zx8_Qw3-Er5tYu7iOp9aSd1fGh2jKl4zXc6vBn8mQ0w",
}


@pytest.mark.parametrize("value", list(SECRETS.values()), ids=list(SECRETS))
def test_secret(redactor: Redactor, value: str) -> None:
    assert_redacted(redactor, value, "SECRET")


def test_bearer_value_is_redacted_and_the_word_kept(redactor: Redactor) -> None:
    token = "abcDEF123456ghiJKL789mnoPQR"
    out = redactor.redact(f"Authorization: Bearer {token}")
    assert out.text == f"Authorization: Bearer {redactor.placeholder('SECRET', token)}"
    assert out.found == {"SECRET": 1}


def test_pem_block_without_end_line(redactor: Redactor) -> None:
    head = PEM.rsplit("\n", 1)[0]  # cut before the END line
    out = redactor.redact(f"my key:\n{head}")
    assert "MIIEowIBAAKCAQEA" not in out.text
    assert "BEGIN RSA PRIVATE KEY" not in out.text
    assert out.found == {"SECRET": 1}


def test_the_generated_loraflow_key_format_is_caught(redactor: Redactor) -> None:
    # registry/keys.py: KEY_PREFIX + secrets.token_urlsafe(32)
    import secrets

    for _ in range(20):
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        assert redactor.redact(f"x-api-key: {key}").found == {"SECRET": 1}


def test_many_classes_in_one_text(redactor: Redactor) -> None:
    text = (
        "Hi, I'm reachable at jane@example.org or +1 (415) 555-0132. Card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, from 203.0.113.7 with key AKIAIOSFODNN7EXAMPLE."
    )
    out = redactor.redact(text)
    assert out.found == {
        "EMAIL_ADDRESS": 1,
        "PHONE_NUMBER": 1,
        "CREDIT_CARD": 1,
        "IBAN_CODE": 1,
        "IP_ADDRESS": 1,
        "SECRET": 1,
    }
    assert out.text.startswith("Hi, I'm reachable at <EMAIL_ADDRESS_")
    assert out.text.endswith(">.")
    assert len(PLACEHOLDER.findall(out.text)) == 6


# --- left alone -------------------------------------------------------------------------------


# Near misses: card-shaped numbers that fail the Luhn check, IBANs with wrong check digits.
NOT_CARDS = ["4111 1111 1111 1112", "1234 5678 9012 3456", "4111111111111112"]
NOT_IBANS = ["DE89 3704 0044 0532 0130 01", "GB82WEST12345698765433"]


def test_the_near_misses_fail_their_checksum_and_the_checks_pass_real_ones() -> None:
    assert [n for n in NOT_CARDS if luhn_ok(n)] == []
    assert [n for n in NOT_IBANS if iban_ok(n)] == []
    assert luhn_ok("4111 1111 1111 1111") and iban_ok("DE89 3704 0044 0532 0130 00")


@pytest.mark.parametrize(
    "text",
    [
        *NOT_CARDS,
        *NOT_IBANS,
        "The quick brown fox jumps over the lazy dog; nothing personal here.",
        "Shipped on 2024-05-01, delivered on 3 May 2024 at 12:30.",
        "Your order #12345 is on its way.",
        "I have 42 apples and 7 pears, total 1337.",
        "pi is 3.14159 and version 1.2.3 was released",
        "the bearer of this letter; sk-learn and task-management are words",
        "user@localhost is not a routable address",
        "ISBN 978-3-16-148410-0",
        "",
    ],
)
def test_left_unchanged(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == Redacted(text, {})


# --- pseudonyms ---------------------------------------------------------------------------------


def test_placeholder_is_the_keyed_hmac(redactor: Redactor) -> None:
    digest = hmac.new(KEY, b"EMAIL_ADDRESS:jane@example.org", hashlib.sha256).hexdigest()
    assert redactor.placeholder("EMAIL_ADDRESS", "jane@example.org") == f"<EMAIL_ADDRESS_{digest[:12]}>"
    assert placeholder(KEY, "EMAIL_ADDRESS", "jane@example.org") == f"<EMAIL_ADDRESS_{digest[:12]}>"


def test_same_value_same_placeholder_across_texts(redactor: Redactor) -> None:
    a = redactor.redact("write to Jane.Doe@Example.org please")
    b = redactor.redact("cc: jane.doe@example.org\nthanks")
    pa = PLACEHOLDER.findall(a.text)
    pb = PLACEHOLDER.findall(b.text)
    assert pa == pb == [redactor.placeholder("EMAIL_ADDRESS", "jane.doe@example.org")]
    other = redactor.redact("and john@example.org")
    assert PLACEHOLDER.findall(other.text) != pa


@pytest.mark.parametrize(
    ("entity", "spellings"),
    [
        ("PHONE_NUMBER", ["+1 415-555-0132", "+1 (415) 555-0132", "+1.415.555.0132"]),
        ("CREDIT_CARD", ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111"]),
        ("IBAN_CODE", ["DE89 3704 0044 0532 0130 00", "DE89370400440532013000"]),
    ],
)
def test_spellings_of_one_value_agree(redactor: Redactor, entity: str, spellings: list[str]) -> None:
    outs = [redactor.redact(f"value {s} end") for s in spellings]
    assert all(o.found == {entity: 1} for o in outs)
    assert len({o.text for o in outs}) == 1


def test_a_different_key_gives_different_placeholders(redactor: Redactor) -> None:
    out = redactor.redact("jane@example.org")
    assert out.text == placeholder(KEY, "EMAIL_ADDRESS", "jane@example.org")
    assert out.text != placeholder(b"another-key", "EMAIL_ADDRESS", "jane@example.org")


def test_redacting_twice_changes_nothing(redactor: Redactor) -> None:
    text = (
        "jane@example.org, +44 20 7946 0958, 5500 0000 0000 0004, GB82WEST12345698765432, "
        f"2001:db8::1, 10.1.2.3, {SECRETS['openai']}, Bearer {SECRETS['jwt']}\n{PEM}"
    )
    once = redactor.redact(text)
    assert sum(once.found.values()) == 9
    assert redactor.redact(once.text) == Redacted(once.text, {})


def test_a_placeholder_that_looks_like_a_phone_number_is_kept(redactor: Redactor) -> None:
    # About one placeholder in 280 has 12 decimal digits, which can parse as a phone
    # number; text inside a placeholder is never redacted again.
    i = 0
    while not (ph := redactor.placeholder("EMAIL_ADDRESS", f"user{i}@example.org"))[-13:-1].isdigit():
        i += 1
    for text in (ph, f"call {ph} now", f"{ph}{ph}", f"x_{ph}_y"):
        assert redactor.redact(text) == Redacted(text, {})


# --- JSON-like values ---------------------------------------------------------------------------


def test_redact_value_walks_a_chat_messages_list(redactor: Redactor) -> None:
    messages = [
        {"role": "system", "content": "You answer billing questions."},
        {"role": "user", "content": "I'm jane@example.org, card 4111 1111 1111 1111."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and call me at +1 415-555-0132"},
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
            ],
            "name": None,
        },
        {"role": "assistant", "content": "Noted: jane@example.org", "tokens": 12, "ok": True},
    ]
    original = json.loads(json.dumps(messages))
    out, found = redactor.redact_value(messages)
    assert messages == original  # the input is not modified
    assert found == Counter({"EMAIL_ADDRESS": 2, "CREDIT_CARD": 1, "PHONE_NUMBER": 1})
    assert isinstance(out, list)
    email = redactor.placeholder("EMAIL_ADDRESS", "jane@example.org")
    assert out[0] == messages[0]
    assert out[1] == {
        "role": "user",
        "content": f"I'm {email}, card {redactor.placeholder('CREDIT_CARD', '4111111111111111')}.",
    }
    assert out[2]["content"][0] == {
        "type": "text",
        "text": f"and call me at {redactor.placeholder('PHONE_NUMBER', '+1 415-555-0132')}",
    }
    assert out[2]["content"][1] == messages[2]["content"][1]  # type: ignore[index]
    assert out[2]["name"] is None
    assert out[3] == {"role": "assistant", "content": f"Noted: {email}", "tokens": 12, "ok": True}


def test_redact_value_redacts_dict_keys_too_and_keeps_scalars(redactor: Redactor) -> None:
    """A key is text a user wrote as well: a tools schema once named a property after an address."""
    value = {"jane@example.org": "jane@example.org", "n": 4111111111111111, "t": ("10.0.0.1",)}
    out, found = redactor.redact_value(value)
    email = redactor.placeholder("EMAIL_ADDRESS", "jane@example.org")
    assert out == {
        email: email,
        "n": 4111111111111111,
        "t": (redactor.placeholder("IP_ADDRESS", "10.0.0.1"),),
    }
    assert found == Counter({"EMAIL_ADDRESS": 2, "IP_ADDRESS": 1})
    assert redactor.redact_value("plain") == ("plain", Counter())
    assert redactor.redact_value(None) == (None, Counter())


def test_inline_files_and_token_id_prompts_are_replaced_whole(redactor: Redactor) -> None:
    image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}
    out, found = redactor.redact_value(chat)
    assert image not in json.dumps(out) and found == Counter({"DATA_URI": 1})
    assert out["messages"][0]["content"][0]["image_url"]["url"].startswith("<DATA_URI_")  # type: ignore[index]
    for prompt in ([15496, 11, 616, 1438, 318], [[15496, 11], [616, 1438]]):
        out, found = redactor.redact_value({"model": "support", "prompt": prompt})
        assert out == {"model": "support", "prompt": redactor.placeholder("TOKEN_IDS", json.dumps(prompt))}
        assert found == Counter({"TOKEN_IDS": 1})
    kept = {"model": "support", "prompt": "hello", "stop_token_ids": [2, 3], "logit_bias": {"50256": -100}}
    assert redactor.redact_value(kept) == (kept, Counter())


# --- offline, cache, dependencies ---------------------------------------------------------------


def test_no_network_is_used(built: Built) -> None:
    # Building (the fixture: presidio import, blank pipeline, e-mail validation) and
    # redacting ran with the network off; e-mail domains come from tldextract's snapshot.
    assert built.attempts == []
    with no_network() as attempts:
        out = built.redactor.redact("mail ops@foo.dev or a@b.example.co.uk")
    assert out.found == {"EMAIL_ADDRESS": 2}
    assert attempts == []


def test_the_network_guard_sees_a_suffix_list_download() -> None:
    # Proves the guard above is not blind: tldextract's default does try to download.
    import tldextract

    with no_network() as attempts:
        tldextract.TLDExtract(cache_dir=None)("example.com")
    assert attempts


def test_blank_pipeline_is_written_once_and_whole(built: Built) -> None:
    path = built.cache_dir / "spacy-blank-en"
    assert (path / "config.cfg").is_file()
    assert sorted(p.name for p in built.cache_dir.iterdir()) == ["spacy-blank-en"]  # no temp folders
    before = (path / "meta.json").stat().st_mtime_ns
    assert redact._blank_pipeline(built.cache_dir) == path
    assert (path / "meta.json").stat().st_mtime_ns == before


def test_a_blank_pipeline_from_another_spacy_is_replaced(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    path = redact._blank_pipeline(cache_dir)
    meta = json.loads((path / "meta.json").read_text())
    meta["spacy_version"] = ">=2.0.0,<2.1.0"
    (path / "meta.json").write_text(json.dumps(meta))
    assert redact._blank_pipeline(cache_dir) == path
    assert json.loads((path / "meta.json").read_text())["spacy_version"] != ">=2.0.0,<2.1.0"
    assert sorted(p.name for p in cache_dir.iterdir()) == ["spacy-blank-en"]


def test_person_names_without_a_model_says_what_to_set(built: Built) -> None:
    with pytest.raises(MissingDependencyError) as info:
        Redactor(key=KEY, cache_dir=built.cache_dir, person_names=True)
    assert info.value.param == "traffic.spacy_model"
    assert "traffic.spacy_model" in info.value.message


def test_person_names_with_a_model_not_installed_says_what_to_install(built: Built) -> None:
    model = "en_loraflow_not_a_real_pipeline"  # installed nowhere, so this never skips
    with no_network() as attempts, pytest.raises(MissingDependencyError) as info:
        Redactor(key=KEY, cache_dir=built.cache_dir, person_names=True, spacy_model=model)
    assert attempts == []  # refused, not downloaded
    assert info.value.param == "traffic.spacy_model"
    assert f"python -m spacy download {model}" in info.value.message


def test_person_names_with_a_pipeline_without_ner_is_refused(built: Built) -> None:
    blank = built.cache_dir / "spacy-blank-en"
    with pytest.raises(MissingDependencyError) as info:
        Redactor(key=KEY, cache_dir=built.cache_dir, person_names=True, spacy_model=str(blank))
    assert info.value.param == "traffic.spacy_model"
    assert "no NER component" in info.value.message


def test_without_presidio_it_says_which_extra_to_install(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # import fails
    with pytest.raises(MissingDependencyError) as info:
        Redactor(key=KEY, cache_dir=built.cache_dir)
    assert "pip install 'loraflow[traffic]'" in info.value.message


def test_overlapping_spans_keep_the_first_taken() -> None:
    spans = redact._Spans([(10, 20)])
    assert not spans.add(15, 25)
    assert not spans.add(5, 11)
    assert not spans.add(12, 18)
    assert not spans.add(0, 30)
    assert spans.add(20, 25)
    assert spans.add(0, 10)
    assert not spans.add(24, 26)
    assert spans.add(25, 26)
