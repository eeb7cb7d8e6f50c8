package com.piclumen.example;

import com.google.rpc.ErrorInfo;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import com.piclumen.v1.CheckImageRequest;
import com.piclumen.v1.GenerateImageRequest;
import com.piclumen.v1.GenerateImageResponse;
import com.piclumen.v1.Image;
import com.piclumen.v1.ImageJob;
import com.piclumen.v1.ImageServiceGrpc;
import com.piclumen.v1.JobState;
import com.piclumen.v1.Resolution;
import com.piclumen.v1.WatchImageRequest;
import java.util.Iterator;
import java.util.concurrent.TimeUnit;

/**
 * The piclumen.v1 scenario from Java: GenerateImage, WatchImage (printing each
 * state), CheckImage, and a rejected token with its ErrorInfo reason.
 */
public final class Client {
  private Client() {}

  public static void main(String[] args) throws Exception {
    String addr = System.getenv().getOrDefault("PICLUMEN_ADDR", "localhost:50051");
    String token = System.getenv().getOrDefault("PICLUMEN_TOKEN", "demo-token");
    ManagedChannel channel = ManagedChannelBuilder.forTarget(addr).usePlaintext().build();
    try {
      run(channel, token);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.out.println("java client: OK");
  }

  private static ImageServiceGrpc.ImageServiceBlockingStub stub(ManagedChannel channel, String token) {
    Metadata headers = new Metadata();
    headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + token);
    return ImageServiceGrpc.newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers));
  }

  private static void check(boolean ok, String message) {
    if (!ok) {
      throw new IllegalStateException(message);
    }
  }

  private static void run(ManagedChannel channel, String token) {
    ImageServiceGrpc.ImageServiceBlockingStub client = stub(channel, token);
    GenerateImageResponse created = client.withDeadlineAfter(30, TimeUnit.SECONDS).generateImage(
        GenerateImageRequest.newBuilder()
            .setPrompt("a lighthouse at dawn")
            .setResolution(Resolution.newBuilder().setBatchSize(2))
            .build());
    System.out.printf("mark_id=%s seed=%d%n", created.getMarkId(), created.getSeed());

    ImageJob last = null;
    Iterator<com.piclumen.v1.WatchImageResponse> updates = client.withDeadlineAfter(60, TimeUnit.SECONDS)
        .watchImage(WatchImageRequest.newBuilder().setMarkId(created.getMarkId()).build());
    while (updates.hasNext()) {
      last = updates.next().getJob();
      System.out.printf("state=%s queue=%d%n", last.getState(), last.getQueuePosition());
    }
    check(last != null && last.getState() == JobState.JOB_STATE_SUCCEEDED, "watch did not end SUCCEEDED: " + last);

    ImageJob job = client.withDeadlineAfter(30, TimeUnit.SECONDS)
        .checkImage(CheckImageRequest.newBuilder().setMarkId(created.getMarkId()).build())
        .getJob();
    check(job.getState() == JobState.JOB_STATE_SUCCEEDED && job.getImagesCount() == 2, "CheckImage: " + job);
    for (Image image : job.getImagesList()) {
      check(!image.getUrl().isEmpty(), "image without URL");
      System.out.println("image: " + image.getUrl());
    }

    try {
      stub(channel, "not-a-valid-token").withDeadlineAfter(30, TimeUnit.SECONDS)
          .generateImage(GenerateImageRequest.newBuilder().setPrompt("x").build());
      throw new IllegalStateException("a bad token was accepted");
    } catch (StatusRuntimeException e) {
      check(e.getStatus().getCode() == Status.Code.UNAUTHENTICATED, "want UNAUTHENTICATED, got " + e.getStatus());
      String reason = "";
      for (com.google.protobuf.Any detail : StatusProto.fromThrowable(e).getDetailsList()) {
        if (detail.is(ErrorInfo.class)) {
          try {
            reason = detail.unpack(ErrorInfo.class).getReason();
          } catch (com.google.protobuf.InvalidProtocolBufferException bad) {
            throw new IllegalStateException(bad);
          }
        }
      }
      check(reason.equals("TOKEN_REJECTED"), "want reason TOKEN_REJECTED, got " + reason);
      System.out.println("bad token: UNAUTHENTICATED reason=" + reason);
    }
  }
}
