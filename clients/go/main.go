// Command client runs the piclumen.v1 scenario from Go: GenerateImage,
// WatchImage (printing each state), CheckImage, WatchImages (three new jobs
// and an unknown id on one stream), and a rejected token. Every
// call carries W3C trace context (OpenTelemetry's TraceContext propagator)
// from one client span, whose trace id it prints, so the server's spans and
// log lines can be found in the same trace.
//
// The channel carries the published retry policy, ../service_config.json
// (or the file named by PICLUMEN_SERVICE_CONFIG). With PICLUMEN_SCENARIO=restart
// it runs the restart scenario instead: GenerateImage then CheckImage every
// ~100 ms for PICLUMEN_RESTART_SECONDS (default 8), failing if any call
// returns an error, while the server is restarted under it.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	piclumenv1 "piclumen-client/gen/piclumen/v1"
)

func main() {
	scenario := run
	if os.Getenv("PICLUMEN_SCENARIO") == "restart" {
		scenario = runRestart
	}
	if err := scenario(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		os.Exit(1)
	}
	fmt.Println("go client: OK")
}

// dial opens a channel to PICLUMEN_ADDR with the published retry policy.
func dial() (*grpc.ClientConn, error) {
	addr := envOr("PICLUMEN_ADDR", "localhost:50051")
	// Relative to clients/go, where `go run .` runs.
	path := envOr("PICLUMEN_SERVICE_CONFIG", "../service_config.json")
	serviceConfig, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("service config: %w", err)
	}
	return grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(string(serviceConfig)))
}

func run() error {
	token := envOr("PICLUMEN_TOKEN", "demo-token")
	conn, err := dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	client := piclumenv1.NewImageServiceClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A sampled client span (no exporter: only its context travels).
	provider := sdktrace.NewTracerProvider()
	defer func() { _ = provider.Shutdown(context.Background()) }()
	ctx, span := provider.Tracer("piclumen-client").Start(ctx, "interop scenario")
	defer span.End()
	fmt.Printf("trace_id=%s\n", span.SpanContext().TraceID())
	authed := withTraceContext(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token))

	created, err := client.GenerateImage(authed, &piclumenv1.GenerateImageRequest{
		Prompt:     "a lighthouse at dawn",
		Resolution: &piclumenv1.Resolution{BatchSize: 2},
	})
	if err != nil {
		return fmt.Errorf("GenerateImage: %w", err)
	}
	fmt.Printf("mark_id=%s seed=%d\n", created.GetMarkId(), created.GetSeed())

	stream, err := client.WatchImage(authed, &piclumenv1.WatchImageRequest{MarkId: created.GetMarkId()})
	if err != nil {
		return fmt.Errorf("WatchImage: %w", err)
	}
	var last *piclumenv1.ImageJob
	for {
		update, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("WatchImage stream: %w", err)
		}
		last = update.GetJob()
		fmt.Printf("state=%s queue=%d\n", last.GetState(), last.GetQueuePosition())
	}
	if last.GetState() != piclumenv1.JobState_JOB_STATE_SUCCEEDED {
		return fmt.Errorf("watch ended in %s", last.GetState())
	}

	checked, err := client.CheckImage(authed, &piclumenv1.CheckImageRequest{MarkId: created.GetMarkId()})
	if err != nil {
		return fmt.Errorf("CheckImage: %w", err)
	}
	images := checked.GetJob().GetImages()
	if checked.GetJob().GetState() != piclumenv1.JobState_JOB_STATE_SUCCEEDED || len(images) != 2 {
		return fmt.Errorf("CheckImage: want SUCCEEDED with 2 images, got %v", checked.GetJob())
	}
	for _, image := range images {
		if image.GetUrl() == "" {
			return errors.New("CheckImage: image without URL")
		}
		fmt.Println("image:", image.GetUrl())
	}

	if err := watchMany(authed, client); err != nil {
		return err
	}

	badCtx := withTraceContext(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer not-a-valid-token"))
	_, err = client.GenerateImage(badCtx, &piclumenv1.GenerateImageRequest{Prompt: "x"})
	st := status.Convert(err)
	if st.Code() != codes.Unauthenticated {
		return fmt.Errorf("bad token: want UNAUTHENTICATED, got %v", err)
	}
	reason := ""
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			reason = info.GetReason()
		}
	}
	if reason != "TOKEN_REJECTED" {
		return fmt.Errorf("bad token: want ErrorInfo reason TOKEN_REJECTED, got %q", reason)
	}
	fmt.Printf("bad token: %s reason=%s\n", st.Code(), reason)
	return nil
}

// watchMany starts three jobs and watches them on one WatchImages stream,
// together with an id this token does not own: every job must end
// SUCCEEDED with exactly one terminal message, the unknown id must get one
// message with a NOT_FOUND error, and the stream must end OK after the last.
func watchMany(ctx context.Context, client piclumenv1.ImageServiceClient) error {
	const unknown = "no-such-job-of-this-token"
	var ids []string
	for i := 1; i <= 3; i++ {
		created, err := client.GenerateImage(ctx, &piclumenv1.GenerateImageRequest{
			Prompt: fmt.Sprintf("a lighthouse at dawn, take %d", i),
		})
		if err != nil {
			return fmt.Errorf("GenerateImage %d: %w", i, err)
		}
		ids = append(ids, created.GetMarkId())
	}
	stream, err := client.WatchImages(ctx, &piclumenv1.WatchImagesRequest{MarkIds: append(ids, unknown)})
	if err != nil {
		return fmt.Errorf("WatchImages: %w", err)
	}
	// Each id's last word: its terminal state, or its error's code.
	final := map[string]string{}
	for {
		update, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("WatchImages stream: %w", err)
		}
		if update.GetHeartbeat() {
			continue
		}
		id := update.GetJob().GetMarkId()
		if last, ended := final[id]; ended {
			return fmt.Errorf("WatchImages: a message for %s after its last (%s)", id, last)
		}
		if e := update.GetError(); e != nil {
			final[id] = codes.Code(e.GetCode()).String()
			fmt.Printf("watch_images: %s error=%s %q\n", id, codes.Code(e.GetCode()), e.GetMessage())
			continue
		}
		state := update.GetJob().GetState()
		fmt.Printf("watch_images: %s state=%s queue=%d\n", id, state, update.GetJob().GetQueuePosition())
		if state == piclumenv1.JobState_JOB_STATE_SUCCEEDED || state == piclumenv1.JobState_JOB_STATE_FAILED {
			final[id] = state.String()
		}
	}
	for _, id := range ids {
		if final[id] != piclumenv1.JobState_JOB_STATE_SUCCEEDED.String() {
			return fmt.Errorf("WatchImages: %s ended %q, want SUCCEEDED", id, final[id])
		}
	}
	if final[unknown] != codes.NotFound.String() {
		return fmt.Errorf("WatchImages: the unknown id got %q, want NotFound", final[unknown])
	}
	fmt.Printf("watch_images: %d SUCCEEDED, 1 NOT_FOUND, stream ended OK\n", len(ids))
	return nil
}

// runRestart calls GenerateImage then CheckImage every ~100 ms for
// PICLUMEN_RESTART_SECONDS while the server restarts: the retry policy must
// keep every error away from this code.
func runRestart() error {
	token := envOr("PICLUMEN_TOKEN", "demo-token")
	seconds, err := strconv.Atoi(envOr("PICLUMEN_RESTART_SECONDS", "8"))
	if err != nil {
		return fmt.Errorf("PICLUMEN_RESTART_SECONDS: %w", err)
	}
	conn, err := dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	client := piclumenv1.NewImageServiceClient(conn)
	authed := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)

	run := time.Now().UnixNano()
	var slowest time.Duration
	calls := 0
	end := time.Now().Add(time.Duration(seconds) * time.Second)
	for i := 0; time.Now().Before(end); i++ {
		start := time.Now()
		ctx, cancel := context.WithTimeout(authed, 30*time.Second)
		created, err := client.GenerateImage(ctx, &piclumenv1.GenerateImageRequest{
			Prompt:    fmt.Sprintf("restart scenario %d", i),
			RequestId: fmt.Sprintf("go-restart-%d-%d", run, i),
		})
		if err == nil {
			_, err = client.CheckImage(ctx, &piclumenv1.CheckImageRequest{MarkId: created.GetMarkId()})
		}
		cancel()
		if err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
		calls += 2
		took := time.Since(start)
		slowest = max(slowest, took)
		if i == 0 {
			fmt.Println("restart scenario: first call ok")
		} else if took > 500*time.Millisecond {
			fmt.Printf("round %d took %v (retried)\n", i, took.Round(time.Millisecond))
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Printf("restart scenario: %d calls, no error, slowest round %v\n", calls, slowest.Round(time.Millisecond))
	return nil
}

// withTraceContext adds the current span's traceparent (and tracestate) to
// the outgoing gRPC metadata through OpenTelemetry's W3C propagator.
func withTraceContext(ctx context.Context) context.Context {
	carrier := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, carrier)
	pairs := make([]string, 0, 2*len(carrier))
	for key, value := range carrier {
		pairs = append(pairs, key, value)
	}
	return metadata.AppendToOutgoingContext(ctx, pairs...)
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
