// The piclumen.v1 scenario from Node.js: GenerateImage, WatchImage (printing
// each state), CheckImage, WatchImages (three new jobs and an unknown id on
// one stream), and a rejected token with its ErrorInfo reason.
//
// The channel carries the published retry policy, ../service_config.json next
// to this file (or the file named by PICLUMEN_SERVICE_CONFIG). With
// PICLUMEN_SCENARIO=restart it runs the restart scenario instead: GenerateImage
// then CheckImage every ~100 ms for PICLUMEN_RESTART_SECONDS (default 8),
// failing if any call rejects, while the server is restarted under it.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '../../proto');
// googleapis' google/rpc/status.proto (WatchImagesResponse.error), vendored.
const VENDOR_ROOT = path.resolve(__dirname, '../../proto-vendor');
const definition = protoLoader.loadSync('piclumen/v1/image_service.proto', {
  includeDirs: [PROTO_ROOT, VENDOR_ROOT],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const { ImageService } = grpc.loadPackageDefinition(definition).piclumen.v1;

// google.rpc.Status and ErrorInfo, enough to read the error details that
// arrive in the `grpc-status-details-bin` trailer.
const rpc = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'Any', id: 3 },
              },
            },
            Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
});

function errorInfoReason(error) {
  const [raw] = error.metadata.get('grpc-status-details-bin');
  const status = rpc.lookupType('google.rpc.Status').decode(raw);
  const info = status.details.find((d) => d.type_url.endsWith('/google.rpc.ErrorInfo'));
  return info && rpc.lookupType('google.rpc.ErrorInfo').decode(info.value).reason;
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 30_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

function watch(client, request, metadata) {
  return new Promise((resolve, reject) => {
    let last;
    const stream = client.WatchImage(request, metadata, { deadline: Date.now() + 60_000 });
    stream.on('data', (update) => {
      last = update.job;
      console.log(`state=${last.state} queue=${last.queue_position}`);
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(last));
  });
}

// Starts three jobs and watches them on one WatchImages stream, together with
// an id this token does not own: every job must end SUCCEEDED with exactly one
// terminal message, the unknown id must get one message with a NOT_FOUND
// error, and the stream must end OK after the last.
async function watchMany(client, metadata) {
  const unknown = 'no-such-job-of-this-token';
  const ids = [];
  for (let i = 1; i <= 3; i++) {
    const created = await call(client, 'GenerateImage', { prompt: `a lighthouse at dawn, take ${i}` }, metadata);
    ids.push(created.mark_id);
  }
  // Each id's last word: its terminal state or its error's code.
  const final = new Map();
  await new Promise((resolve, reject) => {
    const stream = client.WatchImages({ mark_ids: [...ids, unknown] }, metadata, {
      deadline: Date.now() + 60_000,
    });
    stream.on('data', (update) => {
      if (update.heartbeat) return;
      const id = update.job.mark_id;
      if (final.has(id)) {
        reject(new Error(`a message for ${id} after its last (${final.get(id)})`));
        return;
      }
      if (update.error) {
        final.set(id, update.error.code);
        console.log(`watch_images: ${id} error=${update.error.code} ${JSON.stringify(update.error.message)}`);
        return;
      }
      const { state } = update.job;
      console.log(`watch_images: ${id} state=${state} queue=${update.job.queue_position}`);
      if (state === 'JOB_STATE_SUCCEEDED' || state === 'JOB_STATE_FAILED') final.set(id, state);
    });
    stream.on('error', reject);
    stream.on('end', resolve);
  });
  for (const id of ids) assert.equal(final.get(id), 'JOB_STATE_SUCCEEDED', id);
  assert.equal(final.get(unknown), grpc.status.NOT_FOUND, 'the unknown id');
  console.log(`watch_images: ${ids.length} SUCCEEDED, 1 NOT_FOUND, stream ended OK`);
}

// A client of PICLUMEN_ADDR whose channel has the published retry policy.
function newClient() {
  const addr = process.env.PICLUMEN_ADDR || 'localhost:50051';
  const configPath = process.env.PICLUMEN_SERVICE_CONFIG || path.resolve(__dirname, '../service_config.json');
  const serviceConfig = fs.readFileSync(configPath, 'utf8');
  return new ImageService(addr, grpc.credentials.createInsecure(), {
    'grpc.service_config': serviceConfig,
    'grpc.enable_retries': 1,
  });
}

// GenerateImage then CheckImage every ~100 ms while the server restarts: the
// retry policy must keep every error away from this code.
async function restartScenario() {
  const token = process.env.PICLUMEN_TOKEN || 'demo-token';
  const seconds = Number(process.env.PICLUMEN_RESTART_SECONDS || '8');
  const client = newClient();
  const auth = new grpc.Metadata();
  auth.set('authorization', `Bearer ${token}`);
  const run = Date.now();
  let calls = 0;
  let slowest = 0;
  const end = Date.now() + seconds * 1000;
  for (let round = 0; Date.now() < end; round++) {
    const start = Date.now();
    const created = await call(client, 'GenerateImage', {
      prompt: `restart scenario ${round}`,
      request_id: `node-restart-${run}-${round}`,
    }, auth);
    await call(client, 'CheckImage', { mark_id: created.mark_id }, auth);
    calls += 2;
    const took = Date.now() - start;
    slowest = Math.max(slowest, took);
    if (round === 0) {
      console.log('restart scenario: first call ok');
    } else if (took > 500) {
      console.log(`round ${round} took ${took}ms (retried)`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  client.close();
  console.log(`restart scenario: ${calls} calls, no error, slowest round ${slowest}ms`);
}

async function main() {
  if (process.env.PICLUMEN_SCENARIO === 'restart') {
    await restartScenario();
    console.log('node client: OK');
    return;
  }
  const token = process.env.PICLUMEN_TOKEN || 'demo-token';
  const client = newClient();
  const auth = new grpc.Metadata();
  auth.set('authorization', `Bearer ${token}`);

  const created = await call(client, 'GenerateImage', {
    prompt: 'a lighthouse at dawn',
    resolution: { batch_size: 2 },
  }, auth);
  console.log(`mark_id=${created.mark_id} seed=${created.seed}`);

  const last = await watch(client, { mark_id: created.mark_id }, auth);
  assert.equal(last.state, 'JOB_STATE_SUCCEEDED');

  const { job } = await call(client, 'CheckImage', { mark_id: created.mark_id }, auth);
  assert.equal(job.state, 'JOB_STATE_SUCCEEDED');
  assert.equal(job.images.length, 2);
  for (const image of job.images) {
    assert.ok(image.url);
    console.log(`image: ${image.url}`);
  }

  await watchMany(client, auth);

  const bad = new grpc.Metadata();
  bad.set('authorization', 'Bearer not-a-valid-token');
  await assert.rejects(call(client, 'GenerateImage', { prompt: 'x' }, bad), (error) => {
    assert.equal(error.code, grpc.status.UNAUTHENTICATED);
    assert.equal(errorInfoReason(error), 'TOKEN_REJECTED');
    console.log(`bad token: UNAUTHENTICATED reason=${errorInfoReason(error)}`);
    return true;
  });
  client.close();
  console.log('node client: OK');
}

main().catch((error) => {
  console.error('FAIL:', error);
  process.exit(1);
});
