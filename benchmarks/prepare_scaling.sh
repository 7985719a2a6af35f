# Preparation with 1 and 2 workers, alternating (BENCHMARKS.md, issue 16). Run in a directory
# holding c100.txt (python tests/prepare_synthetic_corpus.py c100.txt 100) and p20/tokenizer.
for r in 1 2; do
 for w in 1 2; do
  rm -rf u_$w
  echo "round $r workers $w $(uptime)"
  python "$(dirname "$0")/../tests/prepare_peak_memory.py" python -m experiments.prepare_data --corpus c100.txt --output u_$w --seq-len 128 --tokenizer p20/tokenizer --truncate-stride 4 --workers $w 2>&1 | grep -v "^$" | grep -v "preparing:" | tail -3
  rm -rf u_$w
 done
done
echo "end $(uptime)"
