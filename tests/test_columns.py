"""The typed columns the exports derive from the raw objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from messages_async.export._columns import utc_timestamp, utc_timestamps

_offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
_instants = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=_offsets | st.just(UTC)
)


@given(st.lists(st.none() | _instants, max_size=20))
def test_a_page_of_timestamps_reads_as_each_one_isoformat_would(
    values: list[datetime | None],
) -> None:
    expected = [None if v is None else v.astimezone(UTC).isoformat(sep=" ")[:-6] for v in values]
    assert utc_timestamps(values) == expected
    assert [utc_timestamp(v) for v in values] == expected


def test_timestamps_in_sqlites_own_form() -> None:
    paris = timezone(timedelta(hours=1))
    assert utc_timestamps(
        [
            datetime(2026, 1, 1, 12, 30, 5, tzinfo=UTC),
            datetime(2026, 1, 1, 12, 30, 5, 120000, tzinfo=UTC),
            datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=paris),
            None,
        ]
    ) == [
        "2026-01-01 12:30:05",
        "2026-01-01 12:30:05.120000",
        "2025-12-31 23:00:00.000001",
        None,
    ]
