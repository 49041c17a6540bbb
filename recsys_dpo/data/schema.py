"""The canonical click-log schema every reader produces (DESIGN.md, "Data contracts").

Readers map the user's own column names onto these; `validate.py` checks and normalises a
frame to them. After validation the frame has exactly:

    user_id    Utf8      the user's original id, as a string
    item_id    Utf8      the item's original id, as a string
    timestamp  Int64     unix seconds, or a per-user order index when the log has no time
    clicked    Boolean   True for a positive event (click, purchase, rating, history click)
    seq        Int64     original row order, the tie-break for equal timestamps
and, when the log has them:
    request_id Utf8      groups the items shown together (impression logs)
    position   Int32     0-based rank the item was shown at
    rating     Float64   explicit strength (e.g. a 1-5 star rating)
    weight     Float64   a per-event weight carried into the pairs
    propensity Float64   the probability that the logging policy showed this item at this
                         position in this request, in (0, 1] (off-policy evaluation)
    event      Utf8      the raw event type, kept for reference

Float columns hold finite numbers (NaN / inf are refused or dropped), and `BOUNDS` holds
the values a column may take.
"""

import polars as pl

REQUIRED = ("user_id", "item_id", "timestamp")
OPTIONAL = ("event", "clicked", "request_id", "position", "rating", "weight", "propensity")

CANONICAL_DTYPES: dict[str, pl.DataType] = {
    "user_id": pl.Utf8(),
    "item_id": pl.Utf8(),
    "timestamp": pl.Int64(),
    "clicked": pl.Boolean(),
    "seq": pl.Int64(),
    "request_id": pl.Utf8(),
    "position": pl.Int32(),
    "rating": pl.Float64(),
    "weight": pl.Float64(),
    "propensity": pl.Float64(),
    "event": pl.Utf8(),
}

# A position is a rank (0-based, or 1-based in some logs); a weight scales a loss term, so a
# negative one would turn the preference around; a propensity is a probability, and one of 0
# (an item the logging policy could not show) would divide by zero in every IPS weight.
# (low, high, low inclusive): the values allowed, high always inclusive (None: unbounded).
BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "position": (0, None, True),
    "weight": (0, None, True),
    "propensity": (0, 1, False),
}

# Indexed frames (after vocab): ids become contiguous integers. Item index 0 is padding.
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
PAD_ITEM = 0

# Pairs parquet, one row per context (DESIGN.md): history strictly before the chosen event.
PAIRS_SCHEMA: dict[str, pl.DataType] = {
    "user_idx": pl.Int32(),
    "context": pl.List(pl.Int32()),
    "chosen": pl.Int32(),
    "rejected": pl.List(pl.Int32()),
    "weight": pl.Float32(),
    "source": pl.Utf8(),
    "timestamp": pl.Int64(),
    "seq": pl.Int64(),  # the chosen event's row: (timestamp, seq) orders and names the event
}

# 2: next_item negatives no longer avoid positives of later splits (they leaked held-out items).
# 3: pairs carry the chosen event's seq (max_pairs_per_user counts events, ties by row order);
#    leave-one-out keeps impression requests whole; item ids follow train popularity only.
SCHEMA_VERSION = 3
