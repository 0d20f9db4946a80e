#!/usr/bin/env bash
# A local Ray cluster (one head, listening on 127.0.0.1 only unless --node-ip-address says otherwise) to submit
# metaopt jobs to, with Ray's token authentication on.
#
#   cluster/local.sh [start] [RAY START OPTIONS...]   e.g. cluster/local.sh start --num-cpus=8 --num-gpus=1
#   cluster/local.sh status      prints the address and the exports a client needs
#   cluster/local.sh stop        stops only the head this script started: the process group of the PID it saved
#
# Environment: RAY (the ray command; default this checkout's .venv/bin/ray, else `ray` on PATH), RAY_PORT (GCS
# port, 6379), RAY_DASHBOARD_PORT (dashboard and job API, 8265), METAOPT_RAY_DIR (PID file, log, client exports,
# Ray temp dir). The head runs with the folder of that ray first on its PATH, so a job's `python` is the Python
# of the environment Ray runs in (the Quickstart's .venv), whatever the shell's PATH.
# Authentication: the head takes the token in RAY_AUTH_TOKEN, else in the file RAY_AUTH_TOKEN_PATH, else in
# ~/.ray/auth_token (where a local ray.init() saves one); start writes a new random token to that file if it has
# none, and keeps the file private (mode 0600). Every client needs RAY_AUTH_MODE=token and the same token.
# RAY_AUTH_MODE=disabled starts the head without authentication: whoever reaches its ports can run code as you.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${METAOPT_RAY_DIR:-/tmp/metaopt-ray-$(id -u)}  # short: Ray's socket paths must stay < 108 chars
pid_file=$state/head.pid
client_env=$state/client.env  # the exports a client needs, as start printed them
port=${RAY_PORT:-6379}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
address=http://127.0.0.1:$dashboard_port

ray_command() {  # prints the path of the ray to run
  if [[ -n ${RAY:-} ]]; then command -v "$RAY" || { echo "RAY=$RAY: no such command" >&2; return 1; }
  elif [[ -x $root/.venv/bin/ray ]]; then echo "$root/.venv/bin/ray"
  elif command -v ray; then :
  else echo "ray not found: install this project (see README.md, Quickstart) or set RAY=/path/to/ray" >&2; return 1
  fi
}

running() {  # prints the saved PID while that process is still the `ray start --head` this script launched
  [[ -f $pid_file ]] || return 1
  local pid args; pid=$(<"$pid_file")
  [[ $pid =~ ^[0-9]+$ ]] && args=$(ps -o args= -p "$pid" 2>/dev/null) && [[ $args == *"start --head"* ]] && echo "$pid"
}

# Runs a command as the leader of a new session and process group, keeping its PID (it execs).
if command -v setsid >/dev/null; then new_session=(setsid)
else new_session=(perl -MPOSIX -e 'POSIX::setsid() or die "setsid: $!\n"; exec @ARGV or die "exec: $!\n"' --)  # macOS
fi

alive() { local stat; stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $stat != Z* ]]; }
group_alive() { ps -A -o pgid=,stat= | awk -v group="$1" '$1 == group && $2 !~ /^Z/ {found = 1} END {exit !found}'; }
port_open() { (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Decides how the head authenticates: sets head_env (the head's RAY_AUTH_* variables) and writes the client's
# exports to $client_env.
authentication() {
  local mode=${RAY_AUTH_MODE:-token} file
  case $mode in
    token) head_env=(RAY_AUTH_MODE=token) ;;
    disabled)
      echo "warning: RAY_AUTH_MODE=disabled: the head runs without token authentication; whoever reaches" \
        "127.0.0.1:$dashboard_port or :$port can run code as $(id -un)" >&2
      head_env=(RAY_AUTH_MODE=disabled)
      printf 'export RAY_ADDRESS=%q\nexport RAY_AUTH_MODE=disabled\n' "$address" >"$client_env"
      return 0 ;;
    *) echo "RAY_AUTH_MODE=$mode: cluster/local.sh starts the head with token (the default) or disabled" >&2
      return 1 ;;
  esac
  printf 'export RAY_ADDRESS=%q\nexport RAY_AUTH_MODE=token\n' "$address" >"$client_env"
  if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    echo "# and RAY_AUTH_TOKEN as exported in the shell that started the head" >>"$client_env"
    return 0
  fi
  file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [[ ! -s $file ]]; then
    (umask 077 && mkdir -p "$(dirname "$file")" && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file")
    echo "wrote a new token to $file"
  fi
  if [[ -O $file ]]; then chmod 600 "$file"; fi
  head_env+=(RAY_AUTH_TOKEN_PATH="$file")
  if [[ $file != "$HOME/.ray/auth_token" ]]; then printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$file" >>"$client_env"; fi
}

info() {
  local ray; ray=$(ray_command) && ray=${ray#"$root/"}
  echo "Ray head: $address (PID $1; log: $state/head.log)"
  echo "A \`ray job\` client needs, in its shell (or: . $client_env):"
  sed 's/^/  /' "$client_env"
  echo "Submit a job from $root (its run folder and MLflow store: absolute paths, or a server):"
  echo "  $ray job submit --working-dir . -- python jobs/meta_train.py \\"
  echo "      --config jobs/configs/train_mnist_sigmoid_phnn.yaml --set distributed.workers=2 \\"
  echo "      --set task.data.root=$root/data --output $root/runs/train/mnist-phnn --tracking-uri sqlite:///$root/mlflow.db"
  echo "Follow / stop a job: $ray job logs JOB_ID --follow; $ray job stop JOB_ID"
  echo "Stop the head: $0 stop"
}

start() {
  local pid ray head_env
  if pid=$(running); then info "$pid"; return 0; fi
  if port_open "$dashboard_port"; then
    echo "port $dashboard_port is already in use (another Ray?); set RAY_DASHBOARD_PORT" >&2; return 1
  fi
  ray=$(ray_command)
  mkdir -p "$state"
  authentication
  # --block keeps `ray start` in the foreground as the parent of GCS, raylet and dashboard; a new session makes
  # it the leader of its own process group, so `stop` signals exactly these processes. PATH: a job's `python` is
  # the one beside this ray. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (single-node Ray, as on macOS) keeps the node's
  # IP 127.0.0.1, which Ray otherwise replaces with the machine's: every Ray server of the head then listens on
  # loopback only (measured in cluster/README.md); an explicit --node-ip-address=IP still opens it to other nodes.
  "${new_session[@]}" env "${head_env[@]}" PATH="$(dirname "$ray"):$PATH" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    "$ray" start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="$port" --include-dashboard=true --dashboard-host=127.0.0.1 \
    --dashboard-port="$dashboard_port" --temp-dir="$state/tmp" ${@+"$@"} >"$state/head.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pid_file"
  for _ in $(seq 120); do
    if port_open "$dashboard_port"; then info "$pid"; return 0; fi
    if ! alive "$pid"; then
      rm -f "$pid_file"; tail -n 20 "$state/head.log" >&2; echo "ray start failed; see $state/head.log" >&2; return 1
    fi
    sleep 1
  done
  echo "the dashboard did not come up on port $dashboard_port; stopping" >&2; stop; return 1
}

stop() {
  local pid
  if ! pid=$(running); then rm -f "$pid_file"; echo "no Ray head started by $0 is running"; return 0; fi
  # `ray start` first: it drains the node and stops GCS, raylet and the rest in order (signalled all at once, the
  # raylet would wait for the GCS it outlived); then SIGTERM, and SIGKILL after 10 s, for what is left of its group.
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 30); do alive "$pid" || break; sleep 1; done
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 10); do group_alive "$pid" || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pid_file" "$client_env"
  echo "stopped the Ray head (process group $pid)"
}

case ${1:-start} in
  start) shift $(($# > 0)); start ${@+"$@"} ;;
  stop) stop ;;
  status) if pid=$(running); then info "$pid"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 [start [RAY START OPTIONS...] | status | stop]" >&2; exit 2 ;;
esac
