"""trials.parquet and bits.parquet written by streaming (row groups, two passes over the parts)
are byte-identical to today's write: every part concatenated, sorted at once, written whole."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainables import results as R
from trainables import storage
from trainables.trial import CampaignSettings, TrialPoint, run_trial

POINTS = [TrialPoint("weight", 1, 30, 7), TrialPoint("neuron", 2, 30, 7), TrialPoint("neuron", 1, "random", 7),
          TrialPoint("neuron", 1, 30, 3), TrialPoint("neuron", 1, 30, 3, fault="stuck1"),  # a tie on the sort columns
          TrialPoint("neuron", 1, "random", 3)]


def whole_write(directory, role, schema, order):
    """Today's aggregation (before streaming): concatenate every part, sort, write once."""
    folder = directory / "parts" / role
    tables = [storage.read_table(folder / n, schema=schema) for n in storage.list_names(folder, ".parquet")]
    table = pa.concat_tables(tables).replace_schema_metadata(schema.metadata).sort_by(order)
    return R.parquet_bytes(table), table


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream")
    settings = CampaignSettings(name="s", directory=str(directory), model="demo:vgg", dataset="fashion-mnist",
                                weights="none", images=64, batch_size=64, report_every=64, record="changed")
    for point in POINTS:
        run_trial(settings, point)
    return directory


def test_streaming_aggregation_writes_todays_bytes(campaign):
    trials_bytes, trials = whole_write(campaign, "trials", R.TRIAL_SCHEMA, R.TRIAL_ORDER)
    bits_bytes, _ = whole_write(campaign, "bits", R.BIT_SCHEMA, R.BIT_ORDER)
    state, table = R.check_and_aggregate(campaign)
    assert len(state.finished) == len(POINTS) and table.equals(trials)
    assert (campaign / R.TRIALS_FILE).read_bytes() == trials_bytes
    assert (campaign / R.BITS_FILE).read_bytes() == bits_bytes
    keys = table.column("trial_key").to_pylist()
    assert keys.index(POINTS[4].key) + 1 == keys.index(POINTS[3].key)  # a tie keeps the listing order ('-' < '.')


def test_streaming_in_small_row_groups_and_batches_without_kept_parts_gives_the_same_rows(campaign, monkeypatch):
    """Row groups of 2 rows, parts read 1 at a time, no parts kept from the check (all read again)."""
    _, trials = whole_write(campaign, "trials", R.TRIAL_SCHEMA, R.TRIAL_ORDER)
    _, bits = whole_write(campaign, "bits", R.BIT_SCHEMA, R.BIT_ORDER)
    monkeypatch.setattr(R, "AGGREGATE_ROW_GROUP", 2)
    monkeypatch.setattr(R, "READ_BATCH", 1)
    monkeypatch.setattr(R, "KEEP_PARTS", 0)
    state, (summary, rows) = R.check_and_write(campaign)
    assert rows is None and summary.column("trial_key").equals(trials.column("trial_key"))
    assert summary.column("images").to_pylist() == trials.column("images").to_pylist()
    written = pq.ParquetFile(campaign / R.TRIALS_FILE)
    assert written.metadata.num_row_groups == 3 and written.schema_arrow == R.TRIAL_SCHEMA
    assert written.read().equals(trials)
    assert pq.read_table(campaign / R.BITS_FILE).equals(bits)
