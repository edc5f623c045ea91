"""Counting of skipped bad examples, shared by every reader in this package.

Every reader either raises a ``ValueError`` naming the offending file (and
line, or record) or, when the caller asks for ``skip_bad_examples``, records
the problem in a :class:`ParseReport` and carries on. The report is what the
user sees at the end of a run, so a skip is never silent.
"""

import collections
import dataclasses


@dataclasses.dataclass
class ParseReport:
  """Tally of accepted and skipped entries of one or more inputs.

  Attributes:
    num_ok: entries accepted.
    skipped: ``(location, reason)`` of each skipped entry; ``location`` names
      the file and, where there is one, the line or record.
  """

  num_ok: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  @property
  def num_skipped(self) -> int:
    """Number of skipped entries."""
    return len(self.skipped)

  def add_ok(self, count: int = 1) -> None:
    """Counts ``count`` accepted entries."""
    self.num_ok += count

  def skip(self, location: str, reason: str) -> None:
    """Records one skipped entry.

    Args:
      location: file (and line or record) of the bad entry.
      reason: what was wrong with it.
    """
    self.skipped.append((str(location), reason))

  def merge(self, other: "ParseReport") -> None:
    """Adds the counts and skips of ``other`` to this report."""
    self.num_ok += other.num_ok
    self.skipped.extend(other.skipped)

  def reasons(self) -> dict[str, int]:
    """Returns how many entries were skipped for each kind of reason.

    The kind is the reason text before its first colon, so that e.g. all
    ``"malformed name: ..."`` skips are counted together.
    """
    return dict(collections.Counter(r.split(":")[0] for _, r in self.skipped))

  def summary(self, max_listed: int = 10) -> str:
    """Returns a human-readable summary listing the first skipped entries.

    Args:
      max_listed: at most this many skipped entries are listed one per line.

    Returns:
      A multi-line string.
    """
    lines = [f"{self.num_ok} ok, {self.num_skipped} skipped"]
    for location, reason in self.skipped[:max_listed]:
      lines.append(f"  skipped {location}: {reason}")
    if self.num_skipped > max_listed:
      lines.append(f"  ... and {self.num_skipped - max_listed} more")
    return "\n".join(lines)


def handle_bad_entry(location: str, reason: str, skip_bad_examples: bool,
                     report: ParseReport | None) -> None:
  """Raises for a bad entry, or counts it as skipped.

  Args:
    location: file (and line or record) of the bad entry.
    reason: what was wrong with it.
    skip_bad_examples: if True, record the skip instead of raising.
    report: where skips are recorded; required when skipping.

  Raises:
    ValueError: naming ``location`` and ``reason``, unless skipping.
  """
  location = str(location)
  # Errors from lower layers often already start with the file name.
  if reason.startswith(location + ": "):
    reason = reason[len(location) + 2:]
  if not skip_bad_examples:
    raise ValueError(f"{location}: {reason}")
  if report is None:
    raise ValueError(
        f"{location}: {reason} (skip_bad_examples=True needs a ParseReport)")
  report.skip(location, reason)
