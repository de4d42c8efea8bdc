"""Analysis of fault-injection campaigns: reads the campaign's parquet files into pandas
tables, Wilson intervals, comparisons and plots. Imports neither torch nor ray.

    import analysis
    trials = analysis.load("runs/demo")            # one row per trial
    bits = analysis.load_bits("runs/demo")         # per (trial, bit flipped)
    print("\\n".join(analysis.seed_layer_lines(analysis.per_site(trials))))
"""
from analysis import generation, tokens
from analysis.compare import compare
from analysis.load import golden_warnings, load, load_bits, load_faults
from analysis.paired import is_protected, pair_campaigns, protection_table, seed_protection_lines
from analysis.tables import (
    bit_field,
    per_bit,
    per_bit_field,
    per_seed,
    per_site,
    per_type,
    pool,
    seed_layer_lines,
    site_by_bit,
    write_seed_csv,
)

__all__ = [
    "bit_field", "compare", "generation", "golden_warnings", "is_protected", "pair_campaigns", "protection_table", "seed_protection_lines", "load", "load_bits", "load_faults", "per_bit", "per_bit_field", "per_seed",
    "per_site", "per_type", "pool", "seed_layer_lines", "site_by_bit", "tokens", "write_seed_csv",
]
