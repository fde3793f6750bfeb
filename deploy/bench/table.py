#!/usr/bin/env python3
"""Prints the side-by-side table of deploy/bench.sh from OUT_DIR/rows.tsv.

Each row of rows.tsv is: metric, quorate, anchor, anchor name, goal hint
(written by deploy/bench/{throughput,leader-change,failover}.sh). The
goals of the performance issue live here, in one place: each is a bound on
quorate's figure, on its ratio to the anchor, or both. A metric measured
twice (a re-run appended to the same file) is shown once, the last time.

Usage: deploy/bench/table.py OUT_DIR   (exit status 0; the table says which
goals are met, it does not fail the run)
"""
import sys

# metric -> (label, unit, ratio goal, absolute goal). A ratio goal is
# (">=", 2.0): quorate / anchor at least 2; ("<=", 0.75): at most 0.75.
# An absolute goal is ("<=", 650): quorate's figure at most 650.
GOALS = {
    "failover_writable_p50_ms": ("kill -9 of the primary's host -> replica writable, p50", "ms", ("<=", 0.75), ("<=", 650)),
    "failover_told_p50_ms": ("... -> a client following Watch is told, p50", "ms", ("<=", 0.4), None),
    "leader_kill_read_gap_median_ms": ("Raft leader kill -9 -> longest linearizable-read gap, median", "ms", None, ("<=", 300)),
    "leader_kill_read_gap_max_ms": ("... the same, worst trial", "ms", None, None),
    "leader_kill_stale_read_gap_median_ms": ("... longest stale-read gap, median", "ms", None, ("<=", 50)),
    "leader_kill_stale_read_gap_max_ms": ("... longest stale-read gap, worst trial", "ms", None, ("<=", 50)),
    "linearizable_read_1c_ops_per_s": ("linearizable GetLease (etcd: Range), 1 client", "/s", (">=", 2.0), None),
    "linearizable_read_8c_ops_per_s": ("... 8 clients", "/s", (">=", 2.0), None),
    "linearizable_read_64c_ops_per_s": ("... 64 clients", "/s", (">=", 2.0), None),
    "linearizable_read_64c_p99_ms": ("... 64 clients, p99", "ms", None, ("<=", 5)),
    "read_index_read_1c_ops_per_s": ("GetLease --consistency read-index (a quorum round each, as etcd), 1 client", "/s", None, None),
    "read_index_read_8c_ops_per_s": ("... 8 clients", "/s", None, None),
    "lease_renew_8c_ops_per_s": ("lease renewals (etcd: keep-alives), 8 clients", "/s", (">=", 1.0), None),
    "lease_renew_8c_p99_ms": ("... 8 clients, p99", "ms", None, None),
    "members_kept_fresh": ("members kept fresh by 3 coordinators, default heartbeat, coordinator CPU < 50% (etcd: 1 s leases its keep-alives sustain)", "members", None, (">=", 10000)),
}


def num(s):
    try:
        return float(s)
    except ValueError:
        return None


def holds(op, value, bound):
    return value <= bound if op == "<=" else value >= bound


def fmt(v, unit):
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if unit in ("/s", "members") or v >= 100 else f"{v:.1f}"


def main():
    out = sys.argv[1]
    rows = {}
    with open(out + "/rows.tsv") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4:
                rows[parts[0]] = parts
    print(f"| what | quorate | anchor | quorate / anchor | goal | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    met_all = True
    for metric, (label, unit, ratio_goal, abs_goal) in GOALS.items():
        if metric not in rows:
            continue
        _, q, a, name = rows[metric][:4]
        q, a = num(q), num(a)
        ratio = q / a if q is not None and a not in (None, 0.0) else None
        goal, met = [], True
        if abs_goal:
            goal.append(f"{abs_goal[0]} {abs_goal[1]:g} {unit}")
            met = met and q is not None and holds(abs_goal[0], q, abs_goal[1])
        if ratio_goal:
            goal.append(f"{ratio_goal[0]} {ratio_goal[1]:g}x")
            met = met and ratio is not None and holds(ratio_goal[0], ratio, ratio_goal[1])
        shown = "yes" if met else "NO"
        if not goal:
            shown = "-"
        elif not met:
            met_all = False
        r = "n/a" if ratio is None else f"{ratio:.2f}x"
        print(f"| {label} | {fmt(q, unit)} {unit} | {name}: {fmt(a, unit)} {unit} | {r} | {' and '.join(goal) or '-'} | {shown} |")
    others = [m for m in rows if m not in GOALS]
    for m in others:
        print(f"| {m} | {rows[m][1]} | {rows[m][3]}: {rows[m][2]} | | {rows[m][4] if len(rows[m]) > 4 else ''} | |")
    print()
    print("every goal above met" if met_all else "goals marked NO are not met")


if __name__ == "__main__":
    main()
