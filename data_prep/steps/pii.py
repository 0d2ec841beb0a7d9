"""Personal data: e-mail addresses, public IP addresses and phone numbers become placeholders.

Patterns are strict on purpose (training text loses little when a real number slips through, and a
lot when version numbers, dates and code are mangled):
- e-mail: `local@domain.tld` with a letter TLD of 2+ characters (`user@localhost` stays).
- IPv4 / IPv6: candidates checked by `ipaddress`; by default only *global* addresses are replaced,
  so 127.0.0.1, 10.0.0.1, 192.168.1.1, ::1 and documentation ranges stay (they identify nobody);
  an IPv6 candidate needs 3+ colons (`a::b` in code is not one).
  Not an address: a dotted number after "version"/"v"/"release"/"build" or a `Name/` prefix
  (`version 1.2.3.4`, `v8.8.8.8`, `Chrome/120.0.0.0`), or one with a 5th part (`1.2.3.4.5`).
- phone: `+` and a country code with 8-15 digits (`+49 30 901820`, `+1 (650) 253-0000`),
  North American `(650) 253-0000` / `650-253-0000` / `650.253.0000` (one separator throughout),
  and trunk-prefixed national numbers `030 12345678`, `089/1234567` (9-15 digits). Dates
  (`2023-10-05`, `05.10.2023`, `10/05/2023`), times, ISBNs and plain digit runs are not phones.
Google's libphonenumber (the `phonenumbers` package) was measured instead: 1.2 ms per document
and it took the date 05.10.2023 (region DE) and an order number 12345678901 (region US) for phones.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator

from data_prep.document import Document
from data_prep.steps.base import Step

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver|release|build|v)\.?\s*|[A-Za-z]/)$", re.I)
_PHONE = re.compile(
    r"(?<![\w+/.-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"          # international
    r"|\(\d{3}\) ?\d{3}[-.]\d{4}|\d{3}([-.])\d{3}\1\d{4}"  # North American
    r"|0\d{1,4}[ /-]\d{3,}(?:[ -]\d{2,})*"             # national with trunk prefix 0
    r")(?![\w]|[.-]\d)"
)
_DIGIT = re.compile(r"\d")


class PII(Step):
    name = "pii"
    rules = ("email", "ipv4", "ipv6", "phone")

    def __init__(self, email: str = "<EMAIL>", ip: str = "<IP_ADDRESS>", phone: str = "<PHONE>",
                 only_public_ips: bool = True, disabled=()):
        super().__init__(disabled)
        self.placeholder = {"email": email, "ipv4": ip, "ipv6": ip, "phone": phone}
        self.only_public = only_public_ips

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.removed is None:
                doc.text = self.redact(doc.text)
            yield doc

    def redact(self, text: str) -> str:
        if self.on("email") and "@" in text:
            text = _EMAIL.sub(lambda m: self._replace("email"), text)
        if self.on("ipv4") and "." in text:
            text = _IPV4.sub(lambda m: self._ip(m, "ipv4"), text)
        if self.on("ipv6") and ("::" in text or text.count(":") >= 7):
            text = _IPV6.sub(lambda m: self._ip(m, "ipv6"), text)
        if self.on("phone"):
            text = _PHONE.sub(self._phone, text)
        return text

    def _replace(self, kind: str) -> str:
        self.counts[kind] += 1
        return self.placeholder[kind]

    def _ip(self, m: re.Match, kind: str) -> str:
        if kind == "ipv6" and m.group(0).count(":") < 3:  # b::c in code, not an address
            return m.group(0)
        try:
            addr = ipaddress.ip_address(m.group(0))
        except ValueError:
            return m.group(0)
        if (self.only_public and not addr.is_global) or _VERSION_BEFORE.search(m.string, max(0, m.start() - 16), m.start()):
            return m.group(0)
        return self._replace(kind)

    def _phone(self, m: re.Match) -> str:
        digits = len(_DIGIT.findall(m.group(0)))
        low = 8 if m.group(0).startswith("+") else 9 if m.group(0).startswith("0") else 10
        return self._replace("phone") if low <= digits <= 15 else m.group(0)
