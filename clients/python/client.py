"""The piclumen.v1 scenario from Python: GenerateImage, WatchImage (printing
each state), CheckImage, and a rejected token with its ErrorInfo reason."""

import os
import sys

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


def main() -> None:
    addr = os.environ.get("PICLUMEN_ADDR", "localhost:50051")
    token = os.environ.get("PICLUMEN_TOKEN", "demo-token")
    auth = [("authorization", f"Bearer {token}")]
    with grpc.insecure_channel(addr) as channel:
        client = pb_grpc.ImageServiceStub(channel)
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
