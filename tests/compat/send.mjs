// Sends one of each Segment message type through a real client library, then flushes.
// Usage: node send.mjs <segment|rudderstack> <collector url> <write key> <run id>
import { Analytics as SegmentAnalytics } from '@segment/analytics-node';
import RudderAnalytics from '@rudderstack/rudder-sdk-node';

const [library, url, writeKey, runId] = process.argv.slice(2);
const userId = `${library}-node-${runId}`;
const anonymousId = `anon-${userId}`;

const calls = (a) => {
  a.identify({ userId, anonymousId, traits: { email: 'Ann@Example.com', plan: 'pro' } });
  a.track({ userId, event: 'Order Completed', properties: { total: 42.5, currency: 'EUR' } });
  a.page({ userId, name: 'Pricing', properties: { path: '/pricing' } });
  a.screen({ userId, name: 'Home' });
  a.group({ userId, groupId: 'acme', traits: { name: 'Acme' } });
  a.alias({ userId, previousId: anonymousId });
};

if (library === 'segment') {
  const analytics = new SegmentAnalytics({ writeKey, host: url, flushInterval: 50, maxRetries: 1 });
  analytics.on('error', (err) => {
    console.error('segment error', err);
    process.exitCode = 1;
  });
  calls(analytics);
  await analytics.closeAndFlush({ timeout: 20000 });
} else if (library === 'rudderstack') {
  const analytics = new RudderAnalytics(writeKey, {
    dataPlaneUrl: url,
    flushAt: 100,
    retryCount: 0,
    errorHandler: (err) => {
      console.error('rudderstack error', err);
      process.exitCode = 1;
    },
  });
  calls(analytics);
  await analytics.flush();
} else {
  console.error(`unknown library ${library}`);
  process.exit(2);
}
console.log(`sent 6 messages for ${userId}`);
