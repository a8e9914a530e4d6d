"""moto's DynamoDB emulator, with requests handled one at a time.

moto (5.2.1) applies TransactWriteItems without a lock and, when a transaction fails, restores a
snapshot of the whole table taken before it: under concurrent requests two conflicting
transactions can both succeed, and a failed one can undo another client's writes. Real DynamoDB
is atomic per item and per transaction, so the tests serialize requests here to get the same
semantics. Usage: python3 moto_serial.py -H 127.0.0.1 -p PORT
"""

import argparse
import threading

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ, start_response):
        with lock:
            # Consume the whole response inside the lock: the backend work happens while
            # iterating for some responses.
            return list(app(environ, start_response))

    run_simple(args.host, args.port, serialized, threaded=True)


if __name__ == "__main__":
    main()
