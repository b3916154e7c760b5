# Helpers the scripts that start processes share (bench.sh, callgrind.sh, pgo-train.sh):
# `source scripts/lib.sh`.

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Every process appended to `pids` is stopped when the script exits, and the work directory
# given is removed. SIGINT first: the sidecar's and nginx's fast shutdown. Background jobs of a
# script ignore SIGINT unless they handle it, so what still runs 5 s later gets SIGTERM.
start_cleanup() { # work-dir
  pids=(); CLEANUP_DIR=$1
  trap stop_all EXIT
}
stop_all() {
  local p i running
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for i in $(seq 1 50); do
    running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
    [ "$running" = 1 ] || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$CLEANUP_DIR"
}

# Waits up to 20 s for URL to answer 2xx; fails with the end of LOG if it does not.
wait_http() { # url name log
  for _ in $(seq 1 200); do
    curl -fs -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not start ($1); the end of its log:"; tail -20 "$3"; exit 1
}

# nginx, installed by scripts/setup.sh when missing.
find_nginx() {
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || scripts/setup.sh >&2
  command -v nginx || echo /usr/sbin/nginx
}

# The benchmarks' request: an OpenAI Chat Completions call (115 bytes).
BENCH_REQUEST='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"benchmark request: say hello in one short sentence"}]}'

# The benchmarks' answer: OpenAI-shaped, with usage, padded to SIZE bytes.
bench_answer() { # size
  python3 -c '
import json, sys
size = int(sys.argv[1])
doc = {"model": "gpt-4o-mini", "choices": [{"message": {"role": "assistant", "content": ""}}],
       "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
base = len(json.dumps(doc, separators=(",", ":")))
doc["choices"][0]["message"]["content"] = "x" * max(0, size - base)
print(json.dumps(doc, separators=(",", ":")), end="")' "$1"
}

# Writes $W/NAME.conf: an nginx in the foreground with its files in $W, no access log, the given
# http-block text (servers, upstreams) and main-context directives.
nginx_conf() { # name workers http-block [main-directives]
  cat > "$W/$1.conf" <<NGINX_CONF
daemon off;
worker_processes $2;
${4:-}
pid $W/$1.pid;
error_log $W/$1-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $W; proxy_temp_path $W; fastcgi_temp_path $W; uwsgi_temp_path $W; scgi_temp_path $W;
  $3
}
NGINX_CONF
}

# The upstream every benchmark target ends at: nginx serving $W/www/NAME files to POSTs (static
# files answer POST with 405; the internal redirect serves them as GET).
nginx_upstream_block() { # port
  echo "server { listen 127.0.0.1:$1; default_type application/json; location / { root $W/www; error_page 405 =200 \$uri; } }"
}
# nginx as a plain keep-alive reverse proxy from PORT to UPSTREAM-PORT.
nginx_proxy_block() { # port upstream-port
  echo "upstream up { server 127.0.0.1:$2; keepalive 64; }
  server { listen 127.0.0.1:$1; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
}

# Builds the benchmark tools (release: load generator, pingora floor, OTLP sink) and prints the
# sidecar binary to measure: BENCH_SIDECAR=pgo is the profile-guided build, a path is that
# binary, unset is target/release (built here too only in that case).
build_bench_bins() {
  local bin pkgs=(-p agentmesh-tests)
  case "${BENCH_SIDECAR:-}" in
    "") bin=target/release/agentmesh-proxy; pkgs+=(-p agentmesh-proxy) ;;
    pgo) bin=target/pgo/bin/agentmesh-proxy ;;
    *) bin=$BENCH_SIDECAR ;;
  esac
  cargo build --release -q "${pkgs[@]}" --bins >&2 || exit 1
  [ -x "$bin" ] || { echo "no sidecar binary at $bin (BENCH_SIDECAR=pgo needs scripts/build-pgo.sh first)" >&2; exit 1; }
  echo "$bin"
}
