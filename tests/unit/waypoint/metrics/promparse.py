#!/usr/bin/python3
# Parses a Prometheus text page with Debian's python3-prometheus-client and prints it as JSON
# (a list of families with their samples) for test_metrics.c to compare. Exit 77 (skip) when the
# parser is not installed; any parse error makes the script fail.
import json
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit(77)

with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
out = []
for fam in text_string_to_metric_families(text):
    out.append({
        "name": fam.name,
        "type": fam.type,
        "help": fam.documentation,
        "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in fam.samples],
    })
json.dump(out, sys.stdout)
