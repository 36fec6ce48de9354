"""A fingerprint of a seeded `pfl eval` on the tiny model with every method, for refactors
that must not change behaviour: the results JSON (timings removed) plus the sha256 of every
user's personal state and of the collective parts (stage-1 model, PerFit stage 1).

    git stash; .venv/bin/python .ci/eval_fingerprint.py /tmp/before.json   # or an old checkout
    git stash pop; .venv/bin/python .ci/eval_fingerprint.py /tmp/after.json
    cmp /tmp/before.json /tmp/after.json && echo identical

(Outputs of the random tiny model are mostly empty strings, so the states' digests are what
makes the comparison sharp.)"""
import dataclasses, hashlib, json, sys
import numpy as np, torch
from shared.methods import base
from simulations.evaluate import EvalConfig, run_eval

def digest(x, h):
    if isinstance(x, torch.Tensor):
        h.update(str(tuple(x.shape)).encode()); h.update(x.detach().float().cpu().numpy().tobytes())
    elif isinstance(x, np.ndarray):
        h.update(str(x.shape).encode()); h.update(np.ascontiguousarray(x, np.float32).tobytes())
    elif isinstance(x, torch.nn.Module):
        digest(dict(x.state_dict()), h)
    elif isinstance(x, dict):
        for k in sorted(x, key=str): h.update(str(k).encode()); digest(x[k], h)
    elif isinstance(x, (list, tuple)):
        for v in x: digest(v, h)
    elif hasattr(x, "to_json"):
        h.update(x.to_json().encode())
    elif hasattr(x, "export_arrays"):
        digest(x.export_arrays(), h)
    elif dataclasses.is_dataclass(x):
        digest(dataclasses.asdict(x), h)
    else:
        h.update(repr(x).encode())

states = {}
orig = base.MethodSpec.make_core
def make_core(self):
    core = orig(self)
    inner = core.personalize
    def personalize(runtime, user, aug, profile):
        s = inner(runtime, user, aug, profile)
        h = hashlib.sha256(); digest(s.payload, h)
        states.setdefault(self.name, {})[user.id] = [h.hexdigest(), s.params, s.bytes]
        for key in ("stage1", "perfit_stage1"):
            part = runtime.cache.get(key) if isinstance(runtime.cache, dict) else \
                getattr(runtime.cache, key)  # a dict before the typed RunState
            if part is not None and key not in states:
                h = hashlib.sha256(); digest(part, h); states[key] = h.hexdigest()
        return s
    core.personalize = personalize
    return core
base.MethodSpec.make_core = make_core

ALL = ["nonpersonalized", "random1", "rag1", "pag", "pag+rag1", "lora-c", "lora-p", "oppu",
       "perpcs", "peft-retrieval", "perfit", "oppu+rag1", "perfit+pag", "perpcs+pag"]
config = EvalConfig(task="synthetic", methods=ALL, model="tiny", users=3, device="cpu",
                    sharers=2, collective=3, max_history=8, stage1_epochs=1, personal_epochs=1,
                    progress=False, reuse_trained=False,
                    options={"perpcs": {"gate_steps": 5}, "perfit": {"epochs": 1}})
out = run_eval(config)
for m in out["methods"].values():
    for k in ("seconds_per_user", "prepare_seconds"): m.pop(k, None)
json.dump({"results": out, "states": states}, open(sys.argv[1], "w"), indent=1, sort_keys=True, default=str)
print(len(states), "state groups")
