#!/usr/bin/env python3
"""Cold start of the Lambda binaries: time from process start until the binary asks the Lambda
Runtime API for its first event (GET /2018-06-01/runtime/invocation/next), i.e. until it is
ready to serve. A minimal Runtime API stand-in on loopback answers nothing else; no AWS call is
made (the store client is built, not used). Usage:

    python3 scripts/bench-lambda-start.py target/release/webhook target/release/poller target/release/releases
"""
import http.server
import os
import statistics
import subprocess
import sys
import threading
import time

ready = threading.Event()


class RuntimeApi(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.endswith("/runtime/invocation/next"):
            ready.set()
        # Never hand out an event: the measurement ends when the binary asks for one.
        time.sleep(0.5)
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{server.server_address[1]}",
        "AWS_LAMBDA_FUNCTION_NAME": "bench",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_FUNCTION_VERSION": "1",
        "AWS_LAMBDA_LOG_STREAM_NAME": "bench",
        "AWS_LAMBDA_LOG_GROUP_NAME": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "KITEBRIDGE_TABLE": "bench",
        "BUILDKITE_API_TOKEN": "bk",
        "BUILDKITE_ORGANIZATION": "acme",
        "BUILDKITE_WEBHOOK_TOKEN": "whk",
        "BITBUCKET_URL": "http://127.0.0.1:9",
        "BITBUCKET_TOKEN": "bb",
        "KITEBRIDGE_API_TOKEN": "api",
    }
    # Extra NAME=VALUE settings from the environment variable BENCH_ENV (comma-separated).
    for pair in filter(None, os.environ.get("BENCH_ENV", "").split(",")):
        name, _, value = pair.partition("=")
        env[name] = value
    for binary in sys.argv[1:]:
        times = []
        for _ in range(20):
            ready.clear()
            start = time.perf_counter()
            proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ok = ready.wait(5)
            elapsed = (time.perf_counter() - start) * 1000
            proc.kill()
            proc.wait()
            if not ok:
                print(f"{binary}: never asked for an event", file=sys.stderr)
                sys.exit(1)
            times.append(elapsed)
        times.sort()
        print(f"{os.path.basename(binary)}: ready after median {statistics.median(times):.1f} ms "
              f"(min {times[0]:.1f}, max {times[-1]:.1f}, 20 runs); {os.path.getsize(binary) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
