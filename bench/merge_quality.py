#!/usr/bin/env python3
"""Merge runs of bench/quality.py made with other --seeds/--methods/--ratios into one JSON
(seeds key the draws, so separate runs give the same draws as one): base first, then the rest."""
import json, sys
out, base, *more = sys.argv[1:]
A = json.load(open(base))
A["merged_from"] = [base] + more
for path in more:
    B = json.load(open(path))
    assert A["max_tokens"] == B["max_tokens"] and abs(A["dense"]["ppl"] - B["dense"]["ppl"]) < 1e-9
    for m, by in B["runs"].items():
        for r, runs in by.items():
            A["runs"].setdefault(m, {}).setdefault(r, []).extend(runs)
    A["timings"].setdefault("energy_self", []).extend(B["timings"].get("energy_self", []))
    A["energy_guard_channels"] += B.get("energy_guard_channels", [])
A.pop("summary", None)
json.dump(A, open(out, "w"), indent=2)
