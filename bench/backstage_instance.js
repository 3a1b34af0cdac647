#!/usr/bin/env node
// One Backstage backend instance for bench/latency.py (the cross-instance latency benchmark).
//
//   BACKSTAGE_ANCHOR_DIR=/tmp/backstage-anchor node bench/backstage_instance.js --config a.yaml
//
// It runs @backstage/backend-defaults with @backstage/plugin-events-backend (HTTP ingress and the
// event bus) and a small plugin of ours, `benchlatency`, all resolved from the anchor's
// node_modules (BACKSTAGE_ANCHOR_DIR, the folder <shared>/anchors/backstage/setup.sh prints).
// The config files (ports, database, events.http.topics) come from the driver (--config).
//
// Environment:
//   BENCH_SUBSCRIBER_ID  subscribe with this id (Backstage makes it `benchlatency.<id>`);
//                        empty or unset: no subscriber at all (an ingress-only instance)
//   BENCH_TOPICS         comma-separated topics to subscribe to (default: plain)
//
// Routes (no auth needed):
//   GET  /api/benchlatency/records  {subscriber, count, local, records: [[n, receivedAt, sentAt]]}
//        receivedAt is the handler's clock (epoch ms, sub-ms precision); sentAt is the
//        x-bench-sent-at header from the event's metadata, or null. Backstage's bus does not
//        carry metadata, so an event that crossed instances has null: the driver computes the
//        latency from its own record of the send time. `local` counts events that still had
//        metadata, i.e. were delivered in-process by the instance that published them.
//   POST /api/benchlatency/reset    forget the records
'use strict';

const path = require('node:path');
const { createRequire } = require('node:module');
const { performance } = require('node:perf_hooks');

const anchorDir = process.env.BACKSTAGE_ANCHOR_DIR;
if (!anchorDir) {
  console.error('BACKSTAGE_ANCHOR_DIR must name the installed Backstage anchor');
  process.exit(2);
}
const anchorRequire = createRequire(path.join(path.resolve(anchorDir), 'package.json'));
const { createBackend } = anchorRequire('@backstage/backend-defaults');
const { createBackendPlugin, coreServices } = anchorRequire('@backstage/backend-plugin-api');
const { eventsServiceRef } = anchorRequire('@backstage/plugin-events-node');
const express = anchorRequire('express');

const SENT_AT = 'x-bench-sent-at';
const subscriberId = (process.env.BENCH_SUBSCRIBER_ID || '').trim();
const topics = (process.env.BENCH_TOPICS || 'plain')
  .split(',')
  .map(t => t.trim())
  .filter(Boolean);

// Wall clock with sub-millisecond precision (Date.now() only has whole milliseconds).
const epochMs = () => performance.timeOrigin + performance.now();

let records = [];
let local = 0;

const latencyPlugin = createBackendPlugin({
  pluginId: 'benchlatency',
  register(env) {
    env.registerInit({
      deps: { events: eventsServiceRef, httpRouter: coreServices.httpRouter },
      async init({ events, httpRouter }) {
        if (subscriberId) {
          await events.subscribe({
            id: subscriberId,
            topics,
            onEvent: async params => {
              const receivedAt = epochMs();
              const header = (params.metadata || {})[SENT_AT];
              const sentAt = header === undefined ? null : Number(header);
              if (sentAt !== null) local++;
              const n = params.eventPayload && params.eventPayload.n;
              records.push([typeof n === 'number' ? n : -1, receivedAt, sentAt]);
            },
          });
        }
        const router = express.Router();
        router.get('/records', (_req, res) => {
          res.json({
            subscriber: subscriberId ? `benchlatency.${subscriberId}` : null,
            count: records.length,
            local,
            records,
          });
        });
        router.post('/reset', (_req, res) => {
          records = [];
          local = 0;
          res.json({ count: 0 });
        });
        httpRouter.use(router);
        httpRouter.addAuthPolicy({ path: '/', allow: 'unauthenticated' });
      },
    });
  },
});

const backend = createBackend();
backend.add(anchorRequire('@backstage/plugin-events-backend'));
backend.add(latencyPlugin);
backend.start().catch(error => {
  console.error(error);
  process.exit(1);
});
