"""PII placeholders on hand-built text: what is replaced, and the documented look-alikes that are not."""

from __future__ import annotations

import pytest

from data_prep.document import Document
from data_prep.steps import PII

REPLACED = [
    ("Write to jane.doe+news@example.co.uk today.", "Write to <EMAIL> today.", "email"),
    ("admin@mail-server.example.org answered", "<EMAIL> answered", "email"),
    ("The resolver 8.8.8.8 timed out.", "The resolver <IP_ADDRESS> timed out.", "ipv4"),
    ("Reach 2001:4860:4860::8888 first", "Reach <IP_ADDRESS> first", "ipv6"),
    ("Call +1 (650) 253-0000 now", "Call <PHONE> now", "phone"),
    ("Ring +49 30 901820 or +44 20 7946 0958.", "Ring <PHONE> or <PHONE>.", "phone"),
    ("Office (650) 253-0000, desk 650-253-0000, fax 650.253.0001.", "Office <PHONE>, desk <PHONE>, fax <PHONE>.", "phone"),
    ("Berlin 030 12345678, Munich 089/1234567.", "Berlin <PHONE>, Munich <PHONE>.", "phone"),
]

KEPT = [
    "Upgrade to version 1.2.3.4 before Friday.",        # a version number, not an address
    "Built with v8.8.8.8 and Chrome/120.0.0.0 headers.",  # version prefix, product/version
    "Schema 1.2.3.4.5 and 999.1.1.1 and 01.02.03.04.",   # five parts, octet > 255, leading zeros
    "Local 127.0.0.1, 10.0.0.1, 192.168.1.1 and ::1.",   # not global: identifies nobody
    "Dates 2023-10-05, 05.10.2023, 10/05/2023 at 12:30:45.",
    "ISBN 978-3-16-148410-0, order 12345678901, price 1,234,567.",
    "Mixed separators 650-253.0000 are not a phone.",
    "user@localhost is local; x = a@b is code; std::vector<int> and a::b too.",
    "The tally moved +12 34 56 points.",                # too few digits for a phone
]


@pytest.mark.parametrize("text,want,kind", REPLACED)
def test_replaced_with_a_placeholder_and_counted(text, want, kind):
    step = PII()
    [doc] = step([Document("d", text)])
    assert doc.text == want and doc.removed is None
    assert set(step.counts) == {kind} and step.counts[kind] == want.count("<")


@pytest.mark.parametrize("text", KEPT)
def test_look_alikes_are_left_alone(text):
    step = PII()
    assert step.redact(text) == text and not step.counts


def test_kinds_can_be_switched_off_and_placeholders_chosen():
    text = "Mail a@example.com from 8.8.8.8 or call +44 20 7946 0958."
    assert PII(disabled=["pii:phone", "email"]).redact(text) == "Mail a@example.com from <IP_ADDRESS> or call +44 20 7946 0958."
    assert PII(ip="[ip]", only_public_ips=False).redact("at 10.0.0.1") == "at [ip]"
    with pytest.raises(ValueError, match="unknown rule"):
        PII(disabled=["pii:ssn"])
