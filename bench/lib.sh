# Shared by the benchmarks in bench/ (sourced, not run).

# Installs Debian packages when a command is missing: install_missing "cmd..." "package...".
install_missing() {
  local cmd missing=0
  for cmd in $1; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
  if (( missing )); then
    echo "installing $2..." >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # a list of package names
    apt-get update -qq >/dev/null && apt-get install -y -qq $2 >/dev/null
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

# A scratch directory in WORK and a list of processes in PIDS, both cleaned up at exit: the
# processes killed and waited for, the directory removed (KEEP=1 keeps it and says where).
work_dir() {
  WORK=$(mktemp -d)
  PIDS=()
  trap cleanup_work EXIT
}
cleanup_work() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${KEEP:-0} == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The location block of nginx as the reverse proxy strangler is compared with: upstream
# keep-alive and the same headers strangler adds. One definition, so every benchmark compares
# against the same nginx. proxy_max_temp_file_size 0: a large answer that outgrows the proxy
# buffers waits for the client instead of going through a temporary file.
nginx_proxy_location() {
  cat <<'CONF'
    location / {
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Request-Id $request_id; proxy_buffering on;
      proxy_max_temp_file_size 0;
    }
CONF
}

# The nginx.conf of nginx as the reverse proxy under test, listening on NGINX_PROXY, on stdout:
# nginx_proxy_conf "worker_processes 1;" WORKER_CONNECTIONS "server 127.0.0.1:PORT;" (its
# process line, its connection slots, the upstream's servers). One definition, so every
# benchmark compares against the same nginx: upstream keep-alive and bench/lib.sh's location.
nginx_proxy_conf() {
  cat <<CONF
$1
daemon off; pid $WORK/proxy/nginx.pid; error_log $WORK/proxy/error.log warn;
events { worker_connections $2; }
http {
  access_log off; keepalive_requests 1000000;
  upstream backend { $3 keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX_PROXY;
$(nginx_proxy_location)
  }
}
CONF
}

# BIN: the strangler binary to measure; without one, the release build (built here).
strangler_bin() {
  if [[ -z ${BIN:-} ]]; then
    cargo build --release -q --bin strangler
    BIN=target/release/strangler
  fi
  [[ -x $BIN ]] || { echo "BIN=$BIN is not an executable" >&2; exit 1; }
}
