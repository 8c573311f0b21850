"""A Python service that embeds the fleet agent, with a health check of its own.

    CONTROL_PLANE_URL=http://127.0.0.1:8080 INSTANCE_ID=acme-001 AGENT_SECRET=s3cret \\
        python bindings/python/examples/embedded_agent.py --seconds 10

Everything not passed as a keyword comes from the environment, with the same variables and
defaults as the fleet-agent binary. The agent logs through `logging` (logger "fleet"); this
service shows its INFO and above on stderr.
"""

import argparse
import logging
import queue
import time

import fleet

jobs: "queue.Queue[str]" = queue.Queue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    agent = fleet.Agent(heartbeat_interval="1", agent_port="0")

    @agent.add_check("job_queue")
    def job_queue_is_draining() -> bool:
        # A real service would look at its own state; here the queue is simply short.
        return jobs.qsize() < 1000

    with agent:
        print(f"agent running: {agent!r}", flush=True)
        time.sleep(args.seconds)
    print("agent stopped", flush=True)


if __name__ == "__main__":
    main()
