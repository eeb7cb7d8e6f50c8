package com.piclumen.example;

import com.google.gson.Gson;
import com.google.gson.reflect.TypeToken;
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
import com.piclumen.v1.WatchImagesRequest;
import com.piclumen.v1.WatchImagesResponse;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

/**
 * The piclumen.v1 scenario from Java: GenerateImage, WatchImage (printing each
 * state), CheckImage, WatchImages (three new jobs and an unknown id on one
 * stream), and a rejected token with its ErrorInfo reason.
 *
 * <p>The channel carries the published retry policy: ../service_config.json,
 * embedded in the build as a resource (or the file named by
 * PICLUMEN_SERVICE_CONFIG). With PICLUMEN_SCENARIO=restart it runs the restart
 * scenario instead: GenerateImage then CheckImage every ~100 ms for
 * PICLUMEN_RESTART_SECONDS (default 8), failing if any call throws, while the
 * server is restarted under it.
 */
public final class Client {
  private Client() {}

  public static void main(String[] args) throws Exception {
    String addr = System.getenv().getOrDefault("PICLUMEN_ADDR", "localhost:50051");
    String token = System.getenv().getOrDefault("PICLUMEN_TOKEN", "demo-token");
    ManagedChannel channel = ManagedChannelBuilder.forTarget(addr)
        .usePlaintext()
        .defaultServiceConfig(serviceConfig())
        .enableRetry()
        .build();
    try {
      if ("restart".equals(System.getenv("PICLUMEN_SCENARIO"))) {
        restartScenario(channel, token);
      } else {
        run(channel, token);
      }
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.out.println("java client: OK");
  }

  /**
   * The published retry policy as the Map that defaultServiceConfig takes
   * (Gson reads JSON numbers as Double, as it expects).
   */
  private static Map<String, ?> serviceConfig() throws IOException {
    String path = System.getenv("PICLUMEN_SERVICE_CONFIG");
    String json;
    if (path != null && !path.isEmpty()) {
      json = Files.readString(Path.of(path));
    } else {
      try (InputStream in = Client.class.getResourceAsStream("/service_config.json")) {
        check(in != null, "service_config.json is not in the build");
        json = new String(in.readAllBytes(), StandardCharsets.UTF_8);
      }
    }
    return new Gson().fromJson(json, new TypeToken<Map<String, Object>>() {}.getType());
  }

  /**
   * GenerateImage then CheckImage every ~100 ms while the server restarts: the
   * retry policy must keep every error away from this code.
   */
  private static void restartScenario(ManagedChannel channel, String token) throws InterruptedException {
    double seconds = Double.parseDouble(System.getenv().getOrDefault("PICLUMEN_RESTART_SECONDS", "8"));
    ImageServiceGrpc.ImageServiceBlockingStub client = stub(channel, token);
    long run = System.currentTimeMillis();
    int calls = 0;
    long slowest = 0;
    long end = System.nanoTime() + (long) (seconds * 1e9);
    for (int round = 0; System.nanoTime() < end; round++) {
      long start = System.nanoTime();
      GenerateImageResponse created = client.withDeadlineAfter(30, TimeUnit.SECONDS).generateImage(
          GenerateImageRequest.newBuilder()
              .setPrompt("restart scenario " + round)
              .setRequestId("java-restart-" + run + "-" + round)
              .build());
      client.withDeadlineAfter(30, TimeUnit.SECONDS)
          .checkImage(CheckImageRequest.newBuilder().setMarkId(created.getMarkId()).build());
      calls += 2;
      long took = (System.nanoTime() - start) / 1_000_000;
      slowest = Math.max(slowest, took);
      if (round == 0) {
        System.out.println("restart scenario: first call ok");
      } else if (took > 500) {
        System.out.printf("round %d took %dms (retried)%n", round, took);
      }
      Thread.sleep(100);
    }
    System.out.printf("restart scenario: %d calls, no error, slowest round %dms%n", calls, slowest);
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

  /**
   * Starts three jobs and watches them on one WatchImages stream, together
   * with an id this token does not own: every job must end SUCCEEDED with
   * exactly one terminal message, the unknown id must get one message with a
   * NOT_FOUND error, and the stream must end OK after the last.
   */
  private static void watchMany(ImageServiceGrpc.ImageServiceBlockingStub client) {
    String unknown = "no-such-job-of-this-token";
    List<String> ids = new ArrayList<>();
    for (int i = 1; i <= 3; i++) {
      ids.add(client.withDeadlineAfter(30, TimeUnit.SECONDS)
          .generateImage(GenerateImageRequest.newBuilder().setPrompt("a lighthouse at dawn, take " + i).build())
          .getMarkId());
    }
    // Each id's last word: its terminal state or its error's code.
    Map<String, String> last = new HashMap<>();
    Iterator<WatchImagesResponse> updates = client.withDeadlineAfter(60, TimeUnit.SECONDS)
        .watchImages(WatchImagesRequest.newBuilder().addAllMarkIds(ids).addMarkIds(unknown).build());
    while (updates.hasNext()) {
      WatchImagesResponse update = updates.next();
      if (update.getHeartbeat()) {
        continue;
      }
      String id = update.getJob().getMarkId();
      check(!last.containsKey(id), "a message for " + id + " after its last (" + last.get(id) + ")");
      if (update.hasError()) {
        Status.Code code = Status.fromCodeValue(update.getError().getCode()).getCode();
        last.put(id, code.name());
        System.out.printf("watch_images: %s error=%s %s%n", id, code, update.getError().getMessage());
        continue;
      }
      JobState state = update.getJob().getState();
      System.out.printf("watch_images: %s state=%s queue=%d%n", id, state, update.getJob().getQueuePosition());
      if (state == JobState.JOB_STATE_SUCCEEDED || state == JobState.JOB_STATE_FAILED) {
        last.put(id, state.name());
      }
    }
    for (String id : ids) {
      check("JOB_STATE_SUCCEEDED".equals(last.get(id)), id + " ended " + last.get(id) + ", want SUCCEEDED");
    }
    check("NOT_FOUND".equals(last.get(unknown)), "the unknown id got " + last.get(unknown) + ", want NOT_FOUND");
    System.out.printf("watch_images: %d SUCCEEDED, 1 NOT_FOUND, stream ended OK%n", ids.size());
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

    watchMany(client);

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
