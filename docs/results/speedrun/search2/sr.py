import json, subprocess, sys, os, statistics, re
# usage: sr.py NAME FRAC SEEDS  (toml at /tmp/cands/NAME.toml). FRAC other than 1.0 needed an
# uncommitted patch (XFRAC: the last epoch cut short in timed_run); the committed binary ignores it.
name, frac, seeds = sys.argv[1], sys.argv[2], sys.argv[3]
env = dict(os.environ, XFRAC=frac)
out = subprocess.run(["/work/main/target/release/mnist-wgpu","speedrun","--target","99.0","--model",f"/tmp/cands/{name}.toml",
    "--validation","--seeds",seeds,"--backend","cpu","--json"],capture_output=True,text=True,env=env)
if out.returncode: print(name, frac, "FAIL", out.stderr[-500:]); sys.exit()
j = json.loads(out.stdout)
accs=[r["accuracy"] for r in j["runs"]]; ts=[r["train_seconds"] for r in j["runs"]]
line=f"{name:24s} frac={frac:5s} acc={statistics.mean(accs):.3f} [{' '.join(f'{a:.2f}' for a in accs)}] t={statistics.median(ts):.2f}s"
print(line); open("/tmp/cands/log.txt","a").write(line+"\n")
