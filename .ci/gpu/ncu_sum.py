# ncu --csv rows on stdin -> one line per kernel: time and DRAM bytes (ab_gpu.sh).
import csv, sys
rows = [r for r in csv.reader(sys.stdin) if len(r) > 10]
h = rows[0]; k = h.index("Kernel Name"); m = h.index("Metric Name"); v = h.index("Metric Value")
out = {}
for r in rows[1:]:
    out.setdefault(r[k].split("(")[0], {})[r[m]] = float(r[v].replace(",", ""))
print("  ".join("%s %.1f us %.2f GB" % (n[:28], d["gpu__time_duration.sum"] / 1e3, (d["dram__bytes_read.sum"] + d["dram__bytes_write.sum"]) / 1e9) for n, d in out.items()))
