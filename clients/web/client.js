// The piclumen.v1 scenario over gRPC-Web, as a browser app calls it, with
// Connect-ES: GenerateImage, WatchImage (printing each state) to SUCCEEDED,
// CheckImage (the images are there), and a rejected token that must fail
// UNAUTHENTICATED with ErrorInfo reason TOKEN_REJECTED. Any mismatch exits 1.
//
// The transport is connect-node's gRPC-Web over HTTP/1.1, the protocol and
// HTTP version of a browser's fetch(). Generate the code first:
// clients/generate.sh (or `buf generate ../../proto --template buf.gen.yaml`
// here, with node_modules/.bin on PATH).
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcWebTransport } from '@connectrpc/connect-node';
import { BinaryReader } from '@bufbuild/protobuf/wire';
import { ImageService, JobState } from './gen/piclumen/v1/image_service_pb.js';

/** Fails the run with `message` unless `condition` holds. */
function check(condition, message) {
  if (!condition) {
    throw new Error(`check failed: ${message}`);
  }
}

/**
 * google.rpc.ErrorInfo's `reason` (field 1) from an error's details, read
 * with the protobuf wire reader: the scenario needs no generated google.rpc
 * code for one string.
 */
function errorInfoReason(error) {
  const info = error.details.find((d) => d.type === 'google.rpc.ErrorInfo');
  if (!info) {
    return undefined;
  }
  const reader = new BinaryReader(info.value);
  let reason = '';
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1) {
      reason = reader.string();
    } else {
      reader.skip(wireType);
    }
  }
  return reason;
}

async function main() {
  const addr = process.env.PICLUMEN_ADDR || 'localhost:50051';
  const token = process.env.PICLUMEN_TOKEN || 'demo-token';
  const transport = createGrpcWebTransport({
    baseUrl: `http://${addr}`,
    httpVersion: '1.1',
  });
  const client = createClient(ImageService, transport);
  const headers = { authorization: `Bearer ${token}` };

  const created = await client.generateImage(
    { prompt: 'a lighthouse at dawn', resolution: { batchSize: 2 } },
    { headers, timeoutMs: 30_000 },
  );
  check(created.markId !== '', 'GenerateImage returned no mark_id');
  console.log(`mark_id=${created.markId} seed=${created.seed}`);

  let last;
  for await (const update of client.watchImage(
    { markId: created.markId },
    { headers, timeoutMs: 60_000 },
  )) {
    last = update.job;
    console.log(`state=${JobState[last.state]} queue=${last.queuePosition}`);
  }
  check(last !== undefined, 'WatchImage sent no update');
  check(
    last.state === JobState.SUCCEEDED,
    `WatchImage ended in ${JobState[last.state]}, not SUCCEEDED`,
  );

  const { job } = await client.checkImage(
    { markId: created.markId },
    { headers, timeoutMs: 30_000 },
  );
  check(job !== undefined, 'CheckImage returned no job');
  check(job.state === JobState.SUCCEEDED, `CheckImage says ${JobState[job.state]}`);
  check(job.images.length === 2, `expected 2 images, got ${job.images.length}`);
  for (const image of job.images) {
    check(image.url !== '', 'an image without a URL');
    console.log(`image: ${image.url}`);
  }

  let rejected;
  try {
    await client.generateImage(
      { prompt: 'x' },
      { headers: { authorization: 'Bearer not-a-valid-token' }, timeoutMs: 30_000 },
    );
  } catch (error) {
    rejected = ConnectError.from(error);
  }
  check(rejected !== undefined, 'a bad token was accepted');
  check(
    rejected.code === Code.Unauthenticated,
    `bad token: expected Unauthenticated, got ${Code[rejected.code]}: ${rejected.rawMessage}`,
  );
  const reason = errorInfoReason(rejected);
  check(reason === 'TOKEN_REJECTED', `bad token: ErrorInfo reason ${reason}`);
  console.log(`bad token: ${Code[rejected.code]} reason=${reason}`);
  console.log('web client (Connect-ES, gRPC-Web): OK');
}

main().catch((error) => {
  console.error('FAIL:', error);
  process.exit(1);
});
