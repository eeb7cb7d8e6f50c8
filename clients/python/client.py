"""The piclumen.v1 scenario from Python: GenerateImage, WatchImage (printing
each state), CheckImage, WatchImages (three new jobs and an unknown id on one
stream), and a rejected token with its ErrorInfo reason.

The channel carries the published retry policy, ../service_config.json next to
this file (or the file named by PICLUMEN_SERVICE_CONFIG). With
PICLUMEN_SCENARIO=restart it runs the restart scenario instead: GenerateImage
then CheckImage every ~100 ms for PICLUMEN_RESTART_SECONDS (default 8),
failing if any call raises, while the server is restarted under it."""

import os
import sys
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gen"))
from piclumen.v1 import image_service_pb2 as pb  # noqa: E402
from piclumen.v1 import image_service_pb2_grpc as pb_grpc  # noqa: E402


class CheckFailed(Exception):
    """A scenario step got the wrong answer."""


def check(condition: bool, what: object) -> None:
    """Fails the scenario unless `condition` holds. A plain `assert` would do,
    except that `python -O` removes asserts: this check always runs."""
    if not condition:
        raise CheckFailed(what)


def open_channel() -> grpc.Channel:
    """A channel to PICLUMEN_ADDR with the published retry policy."""
    addr = os.environ.get("PICLUMEN_ADDR", "localhost:50051")
    path = os.environ.get(
        "PICLUMEN_SERVICE_CONFIG",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "service_config.json"),
    )
    with open(path, encoding="utf-8") as file:
        service_config = file.read()
    return grpc.insecure_channel(
        addr,
        options=[("grpc.service_config", service_config), ("grpc.enable_retries", 1)],
    )


def restart_scenario() -> None:
    """GenerateImage then CheckImage every ~100 ms while the server restarts:
    the retry policy must keep every error away from this code."""
    token = os.environ.get("PICLUMEN_TOKEN", "demo-token")
    seconds = float(os.environ.get("PICLUMEN_RESTART_SECONDS", "8"))
    auth = [("authorization", f"Bearer {token}")]
    run = time.time_ns()
    calls, slowest, round_ = 0, 0.0, 0
    with open_channel() as chan:
        client = pb_grpc.ImageServiceStub(chan)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            created = client.GenerateImage(
                pb.GenerateImageRequest(
                    prompt=f"restart scenario {round_}",
                    request_id=f"python-restart-{run}-{round_}",
                ),
                metadata=auth,
                timeout=30,
            )
            client.CheckImage(
                pb.CheckImageRequest(mark_id=created.mark_id), metadata=auth, timeout=30
            )
            calls += 2
            took = time.monotonic() - start
            slowest = max(slowest, took)
            if round_ == 0:
                print("restart scenario: first call ok", flush=True)
            elif took > 0.5:
                print(f"round {round_} took {took:.3f}s (retried)", flush=True)
            round_ += 1
            time.sleep(0.1)
    print(f"restart scenario: {calls} calls, no error, slowest round {slowest:.3f}s")


def watch_many(client: pb_grpc.ImageServiceStub, auth: list) -> None:
    """Starts three jobs and watches them on one WatchImages stream, together
    with an id this token does not own: every job must end SUCCEEDED with
    exactly one terminal message, the unknown id must get one message with a
    NOT_FOUND error, and the stream must end OK after the last."""
    unknown = "no-such-job-of-this-token"
    ids = [
        client.GenerateImage(
            pb.GenerateImageRequest(prompt=f"a lighthouse at dawn, take {i}"),
            metadata=auth,
            timeout=30,
        ).mark_id
        for i in range(1, 4)
    ]
    final = {}  # each id's last word: its terminal state or its error's code
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    terminal = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)
    for update in client.WatchImages(
        pb.WatchImagesRequest(mark_ids=[*ids, unknown]), metadata=auth, timeout=60
    ):
        if update.heartbeat:
            continue
        mark_id = update.job.mark_id
        check(mark_id not in final, f"a message for {mark_id} after its last")
        if update.HasField("error"):
            final[mark_id] = update.error.code
            print(f"watch_images: {mark_id} error={update.error.code} {update.error.message!r}")
            continue
        state = update.job.state
        print(f"watch_images: {mark_id} state={pb.JobState.Name(state)} queue={update.job.queue_position}")
        if state in terminal:
            final[mark_id] = pb.JobState.Name(state)
    for mark_id in ids:
        check(final.get(mark_id) == "JOB_STATE_SUCCEEDED", (mark_id, final.get(mark_id)))
    check(final.get(unknown) == not_found, ("unknown id", final.get(unknown)))
    print(f"watch_images: {len(ids)} SUCCEEDED, 1 NOT_FOUND, stream ended OK")


def main() -> None:
    if os.environ.get("PICLUMEN_SCENARIO") == "restart":
        restart_scenario()
        print("python client: OK")
        return
    token = os.environ.get("PICLUMEN_TOKEN", "demo-token")
    auth = [("authorization", f"Bearer {token}")]
    with open_channel() as chan:
        client = pb_grpc.ImageServiceStub(chan)
        created = client.GenerateImage(
            pb.GenerateImageRequest(
                prompt="a lighthouse at dawn", resolution=pb.Resolution(batch_size=2)
            ),
            metadata=auth,
            timeout=30,
        )
        print(f"mark_id={created.mark_id} seed={created.seed}")

        last = None
        for update in client.WatchImage(
            pb.WatchImageRequest(mark_id=created.mark_id), metadata=auth, timeout=60
        ):
            last = update.job
            print(f"state={pb.JobState.Name(last.state)} queue={last.queue_position}")
        check(last is not None and last.state == pb.JOB_STATE_SUCCEEDED, last)

        job = client.CheckImage(
            pb.CheckImageRequest(mark_id=created.mark_id), metadata=auth, timeout=30
        ).job
        check(job.state == pb.JOB_STATE_SUCCEEDED and len(job.images) == 2, job)
        for image in job.images:
            check(bool(image.url), image)
            print(f"image: {image.url}")

        watch_many(client, auth)

        try:
            client.GenerateImage(
                pb.GenerateImageRequest(prompt="x"),
                metadata=[("authorization", "Bearer not-a-valid-token")],
                timeout=30,
            )
            raise CheckFailed("a bad token was accepted")
        except grpc.RpcError as error:
            check(error.code() == grpc.StatusCode.UNAUTHENTICATED, error)
            status = rpc_status.from_call(error)
            reasons = []
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reasons.append(info.reason)
            check(reasons == ["TOKEN_REJECTED"], reasons)
            print(f"bad token: {error.code().name} reason={reasons[0]}")
    print("python client: OK")


if __name__ == "__main__":
    main()
