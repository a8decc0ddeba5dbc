#!/usr/bin/env bash
# The main job on the embedded default (disk store, SmolLM2-135M-Instruct):
#   set up → convert the default model and compute its SVD factors (once) → train a demo OSoRA adapter
#   (once) → start the service → upload the adapter → generate without it, with it, and with it merged at half
#   strength → call a tool (function calling on the base) → the adapter through the Responses API → keep serving.
# Re-running skips what is already built. Ctrl-C stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

DATA=${SVDSERVE_DATA:-$PWD/data}
PORT=${PORT:-8000}
TASK=${DEMO_TASK:-sentiment}
STEPS=${DEMO_STEPS:-60}
ADAPTER="$DATA/demo-$TASK-osora.safetensors"
mkdir -p "$DATA"

if [ ! -f "$ADAPTER" ]; then
  echo "== training a demo OSoRA adapter on the built-in '$TASK' task ($STEPS steps, a few minutes on a CPU)"
  python -m training train --method osora --rank 16 --base default --task "$TASK" --steps "$STEPS" --out "$ADAPTER" | tail -n 1
fi

echo "== starting the service on http://127.0.0.1:$PORT (disk store $DATA/adapters)"
python -m service --base default --store "$DATA/adapters" --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "the service failed to start" >&2; exit 1; }
  sleep 1
done

if ! curl -fs "http://127.0.0.1:$PORT/adapters/demo-$TASK" >/dev/null; then
  echo "== uploading $ADAPTER as adapter 'demo-$TASK'"
  curl -fsS -X POST "http://127.0.0.1:$PORT/adapters" -F "file=@$ADAPTER" -F "adapter_id=demo-$TASK"; echo
fi

PROMPT=$(python -c "from training.tasks import make_task; print(make_task('$TASK').test[0].messages[0][1])" 2>/dev/null \
  || echo "Review: I think the staff was rude and the food was poor.
Sentiment?")
# the base model, the adapter, and the adapter merged at half strength (a request-time merge: ΔW / 2)
for TARGET in '{"adapter_id": null}' "{\"adapter_id\": \"demo-$TASK\"}" \
              "{\"merged_adapters\": {\"ids\": [\"demo-$TASK\"], \"weights\": [0.5]}}"; do
  echo "== POST /generate $TARGET"
  python - "$PORT" "$TARGET" "$PROMPT" <<'PY'
import json, sys, urllib.request
port, target, prompt = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
body = json.dumps({**target, "prompt": prompt, "max_tokens": 24}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
print(json.dumps(json.load(urllib.request.urlopen(req)), indent=2))
PY
done
echo "== POST /v1/chat/completions with a tool, tool_choice required (function calling on the base model)"
python - "$PORT" <<'PY'
import json, sys, urllib.request
port = sys.argv[1]
tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
body = json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": 40, "temperature": 0, "tools": [tool],
                   "tool_choice": "required", "parallel_tool_calls": False,
                   "messages": [{"role": "user", "content": "What's the weather in Paris?"}]}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
choice = json.load(urllib.request.urlopen(req))["choices"][0]
print(json.dumps({"finish_reason": choice["finish_reason"], "tool_calls": choice["message"]["tool_calls"]}, indent=2))
PY
echo "== POST /v1/responses with the adapter (OpenAI's Responses API)"
python - "$PORT" "demo-$TASK" "$PROMPT" <<'PY'
import json, sys, urllib.request
port, model, prompt = sys.argv[1:]
body = json.dumps({"model": model, "input": prompt, "max_output_tokens": 24, "temperature": 0}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/responses", body, {"Content-Type": "application/json"})
resp = json.load(urllib.request.urlopen(req))
print(json.dumps({k: resp[k] for k in ("id", "status", "output", "usage")}, indent=2))
PY
echo "== serving on http://127.0.0.1:$PORT (API docs at /docs); Ctrl-C to stop"
wait $SERVER
