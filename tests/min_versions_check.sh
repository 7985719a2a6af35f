#!/usr/bin/env bash
# Install funnel-jax NON-editable into a fresh venv with the LOWEST versions pyproject.toml allows
# for jax, flax, optax and orbax-checkpoint, then, from another directory, run a short ELECTRA
# pretraining and a forward pass.
#
#     bash tests/min_versions_check.sh [WORKDIR]     # default WORKDIR: a new mktemp -d
#
# Not run by CI: it downloads packages. Needs python3.11 (or $PYTHON) and a package index.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
WORK="${1:-$(mktemp -d /tmp/funnel-minver.XXXXXX)}"
mkdir -p "$WORK"
echo "work dir: $WORK"

# The lower bounds, read from pyproject.toml's dependencies (">=X" becomes "==X").
PINS=$("$PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
wanted = {"jax", "flax", "optax", "orbax-checkpoint"}
pins = []
for dep in deps:
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", dep)
    if m and m.group(1).lower() in wanted:
        pins.append(f"{m.group(1)}=={m.group(2)}")
        if m.group(1).lower() == "jax":
            pins.append(f"jaxlib=={m.group(2)}")
missing = wanted - {p.split("==")[0].lower() for p in pins}
if missing:
    sys.exit(f"pyproject.toml has no '>=' lower bound for {sorted(missing)}")
print(" ".join(pins))
EOF
)
# MINVER_OVERRIDE="flax==0.10.0 ..." tries other versions in place of the pyproject ones.
for o in ${MINVER_OVERRIDE:-}; do
  PINS=$(echo " $PINS " | sed -E "s/ ${o%%==*}==[^ ]+ / $o /")
done
echo "pins: $PINS"

# A copy of the working tree's files (tracked + untracked, not ignored): no .venv, no build dirs.
SRC="$WORK/src"
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) \
  | tar -xf - -C "$SRC"
for o in ${MINVER_OVERRIDE:-}; do  # the copy's lower bound follows an override
  sed -i -E "s/\"${o%%==*}>=[^\"]+\"/\"${o%%==*}>=${o##*==}\"/" "$SRC/pyproject.toml"
done

"$PYTHON" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
python -m pip install "$SRC" $PINS
python -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint|funnel-jax) "

RUN="$WORK/run"
mkdir -p "$RUN" && cd "$RUN"   # not the repository: imports must come from the installed package
python - <<'EOF'
import funnel_jax, experiments, pathlib
for m in (funnel_jax, experiments):
    assert "site-packages" in m.__file__, f"{m.__name__} imported from {m.__file__}"
print("imports from", pathlib.Path(funnel_jax.__file__).parent)
EOF

echo "--- short pretraining"
# warm-up shortened: the default preset's 30 warm-up steps are refused for a 3-step schedule.
python -m experiments.pretrain --steps 3 --set optimizer.warmup_steps=1 \
  --output-dir "$RUN/pretrain"

echo "--- forward pass"
python - <<'EOF'
import jax, numpy as np
import funnel_jax as fj
config = fj.FunnelConfig(vocab_size=64, block_sizes=(1, 1), d_model=16, n_head=2, d_head=8,
                         d_inner=32, num_decoder_layers=1)
module = fj.FunnelModel(config=config)
params = fj.init_params(module, jax.random.PRNGKey(0))
ids = np.arange(2 * 12).reshape(2, 12) % 64
out = module.apply({"params": params}, ids, output_hidden_states=True)
assert out.last_hidden_state.shape == (2, 12, 16), out.last_hidden_state.shape
assert np.isfinite(np.asarray(out.last_hidden_state)).all()
print("forward OK:", out.last_hidden_state.shape, "hidden states:", len(out.hidden_states),
      "jax", jax.__version__)
EOF
echo "min_versions_check: OK"
