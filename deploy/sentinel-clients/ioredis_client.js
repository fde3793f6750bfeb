#!/usr/bin/env node
// Writes in a loop through ioredis in Sentinel mode (npm `ioredis`).
//
// usage: node ioredis_client.js --sentinels HOST:PORT,... --group NAME
//                               [--password-file FILE] [--duration-s N]
//
// Prints one JSON line per write: {"client": "ioredis", "t": <unix s>,
// "ok": true|false, "master": "HOST:PORT" (ok) | "error": "..." (failed)}.
// ioredis asks the Sentinels for the master on every reconnection
// (SENTINEL get-master-addr-by-name) and checks its role.
'use strict';
const fs = require('fs');
const Redis = require('ioredis');

function arg(name, dflt) {
  const i = process.argv.indexOf('--' + name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

const sentinels = arg('sentinels').split(',').map((a) => {
  const i = a.lastIndexOf(':');
  return { host: a.slice(0, i), port: Number(a.slice(i + 1)) };
});
const passwordFile = arg('password-file');
const durationMs = Number(arg('duration-s', '120')) * 1000;

const redis = new Redis({
  sentinels,
  name: arg('group'),
  sentinelPassword: passwordFile ? fs.readFileSync(passwordFile, 'utf8').trim() : undefined,
  connectTimeout: 300,
  commandTimeout: 500,
  maxRetriesPerRequest: 1,
  retryStrategy: () => 50,
  sentinelRetryStrategy: () => 50,
});
redis.on('error', () => {}); // every failure shows as a failed write

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

(async () => {
  const end = Date.now() + durationMs;
  for (let i = 1; Date.now() < end; i++) {
    const line = { client: 'ioredis' };
    try {
      await redis.set('sentinel-client:ioredis', i);
      const s = redis.stream;
      line.ok = true;
      line.master = s ? `${s.remoteAddress}:${s.remotePort}` : '';
    } catch (e) {
      line.ok = false;
      line.error = String(e && e.message ? e.message : e).slice(0, 200);
    }
    line.t = Date.now() / 1000;
    console.log(JSON.stringify(line));
    await sleep(20);
  }
  redis.disconnect();
})();
