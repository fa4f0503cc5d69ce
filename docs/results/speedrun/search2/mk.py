import sys
# usage: mk.py NAME "c24k5b p r c32k3b p r l256 r l10" key=val ...
name, arch = sys.argv[1], sys.argv[2].split()
train = dict(epochs="1", batch_size="256", max_lr="0.01", optimizer='"adam"', betas="[0.7, 0.9]", weight_decay="0.0",
             div_factor="25.0", final_div_factor="10000.0", translate="0", jitter="0.0", rotate="0.0", cutout="0.0")
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1); train[k] = v
out = []
for t in arch:
    if t[0] == "c":
        import re
        m = re.match(r"c(\d+)k(\d+)(b?)(p?)", t)
        out.append(f'[[layer]]\ntype = "conv"\nout = {m[1]}\nkernel = {m[2]}\n' + ("bias = true\n" if m[3] else "") + ("padding = %d\n" % (int(m[2])//2) if m[4] else ""))
    elif t == "p": out.append('[[layer]]\ntype = "maxpool"\n')
    elif t == "a": out.append('[[layer]]\ntype = "avgpool2"\n')
    elif t == "r": out.append('[[layer]]\ntype = "relu"\n')
    elif t == "bn": out.append('[[layer]]\ntype = "batchnorm"\n')
    elif t == "gap": out.append('[[layer]]\ntype = "gap"\n')
    elif t[0] == "l": out.append(f'[[layer]]\ntype = "linear"\nout = {t[1:]}\n')
    elif t[0] == "d": out.append(f'[[layer]]\ntype = "dropout"\np = {t[1:]}\n')
    else: raise SystemExit(t)
s = "\n".join(out) + "\n[train]\n" + "".join(f"{k} = {v}\n" for k, v in train.items())
open(f"/tmp/cands/{name}.toml", "w").write(s)
