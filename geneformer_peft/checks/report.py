"""The compatibility report: what was checked between a model and the data it is given,
each check's numbers, and whether it passed, warned or refused.

Every command that pairs data with a model builds one report up front (through
:func:`geneformer_peft.checks.check_compatibility`), logs it, writes it as JSON where the command
writes outputs, and stops on a refusal before any work. ``geneformer-peft check`` prints it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from geneformer_peft.errors import DataError

logger = logging.getLogger("geneformer_peft.checks")

__all__ = ["OK", "WARNING", "REFUSED", "Finding", "CompatibilityReport", "IncompatibleData", "REPORT_FILE"]

OK, WARNING, REFUSED = "ok", "warning", "refused"
#: the report's file name in a command's output folder
REPORT_FILE = "compatibility.json"


class IncompatibleData(DataError):
    """The data and the model do not fit together (exit code 2); the message lists every refusal."""


@dataclass
class Finding:
    """One check.

    Attributes
    ----------
    check : str
        Its name: ``encoding``, ``vocabulary``, ``gene_ids``, ``truncation``, ``token_dictionary``,
        ``checkpoint``, ``base_model``, ``token_ids``, ``labels``.
    status : str
        ``"ok"``, ``"warning"`` or ``"refused"``.
    message : str
        One sentence a user can act on (for a refusal: the file, the value, the way forward).
    details : dict
        The numbers behind it (JSON-serialisable).
    """

    check: str
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompatibilityReport:
    """The findings of one model/data pairing, in the order they were checked."""

    model_path: str
    data: str
    family: str | None = None
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, status: str, message: str, **details: Any) -> Finding:
        finding = Finding(check, status, message, details)
        self.findings.append(finding)
        return finding

    def extend(self, other: CompatibilityReport) -> None:
        self.findings.extend(other.findings)

    def __getitem__(self, check: str) -> Finding:
        """The first finding of ``check`` (KeyError when that check did not run)."""
        for finding in self.findings:
            if finding.check == check:
                return finding
        raise KeyError(check)

    @property
    def refusals(self) -> list[Finding]:
        return [f for f in self.findings if f.status == REFUSED]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.status == WARNING]

    @property
    def ok(self) -> bool:
        return not self.refusals

    def to_dict(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "data": self.data, "family": self.family,
                "compatible": self.ok, "findings": [asdict(f) for f in self.findings]}

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        from geneformer_peft.files import write_json

        return write_json(path, self.to_dict())

    def log(self) -> None:
        """Warnings at WARNING, passed checks at DEBUG, one INFO line (refusals are raised, not logged)."""
        for finding in self.findings:
            if finding.status == WARNING:
                logger.warning("%s: %s", finding.check, finding.message)
            elif finding.status == OK:
                logger.debug("%s: %s", finding.check, finding.message)
        logger.info("compatibility of %s with %s: %d checks passed, %d warnings, %d refused", self.model_path,
                    self.data, len(self.findings) - len(self.warnings) - len(self.refusals), len(self.warnings),
                    len(self.refusals))

    def raise_if_refused(self) -> None:
        """Log the report and raise :class:`IncompatibleData` listing every refusal."""
        self.log()
        if self.refusals:
            lines = [f"{f.check}: {f.message}" for f in self.refusals]
            raise IncompatibleData(f"model {self.model_path} and data {self.data} do not fit together "
                                   f"({len(lines)} problem{'s' if len(lines) != 1 else ''}, found before any work):\n  "
                                   + "\n  ".join(lines))

    def text(self) -> str:
        """The report as lines for a terminal."""
        mark = {OK: "ok     ", WARNING: "WARNING", REFUSED: "REFUSED"}
        head = [f"model: {self.model_path} ({self.family or 'unknown family'})", f"data:  {self.data}"]
        return "\n".join(head + [f"  {mark[f.status]} {f.check}: {f.message}" for f in self.findings]
                         + [f"compatible: {'yes' if self.ok else 'no'}"])
