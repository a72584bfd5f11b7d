"""Summary of an ncu per-instruction CSV (``ncu --import R --page source --print-source sass
--csv``): totals, then the instructions with the most warp-stall samples (the SASS text,
instructions executed, samples and the top stall reasons). Usage: ncu_top.py FILE [N]."""
import csv
import sys


def _num(v):
    try:
        return float(str(v).replace(",", ""))
    except ValueError:
        return 0.0


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head_i = next(i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r))
    head, body = rows[head_i], [r for r in rows[head_i + 1:] if len(r) == len(rows[head_i])]
    col = {c.strip(): i for i, c in enumerate(head)}
    src = col["Source"]
    samp = next(i for c, i in col.items() if c.startswith("Warp Stall Sampling (All"))
    inst = next((i for c, i in col.items() if c.startswith("Instructions Executed")), None)
    stalls = [(c, i) for c, i in col.items() if c.startswith("stall_") or c.startswith("Stall")]
    tot_s = sum(_num(r[samp]) for r in body)
    tot_i = sum(_num(r[inst]) for r in body) if inst is not None else 0
    print(f"{len(body)} SASS lines, {tot_i:.0f} warp instructions executed, {tot_s:.0f} samples")
    by_reason = sorted(((sum(_num(r[i]) for r in body), c) for c, i in stalls), reverse=True)
    print("stall reasons:", ", ".join(f"{c}={v:.0f}" for v, c in by_reason[:10] if v))
    order = sorted(range(len(body)), key=lambda j: -_num(body[j][samp]))
    for j in order[:top]:
        r = body[j]
        why = sorted(((_num(r[i]), c) for c, i in stalls), reverse=True)[:3]
        print(f"{j:5d} {_num(r[samp]):7.0f} {(_num(r[inst]) if inst is not None else 0):8.0f}  "
              f"{r[src].strip()[:60]:60s} {' '.join(f'{c}={v:.0f}' for v, c in why if v)}")


if __name__ == "__main__":
    main()
