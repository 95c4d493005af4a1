// Type-checks the shipped kith.d.ts the way an app would use it (tsc --noEmit, strict).
import init, { Analytics, type AnalyticsOptions, type JsonObject, type Stats } from '../pkg/kith.js';

await init();
const options: AnalyticsOptions = { writeKey: 'key', endpoint: 'https://collector.example.com', flushAt: 10, autoPage: true };
const analytics = new Analytics(options);
const properties: JsonObject = { total: 42.5, items: [{ sku: 'a', qty: 1 }], coupon: null };
const id: string = analytics.track('Order Completed', properties, { purpose: 'analytics' });
analytics.identify('user-1', { email: 'ann@example.com' });
analytics.identify(undefined, { plan: 'pro' });
analytics.page('Pricing');
analytics.screen('Home', {});
analytics.group('acme', { name: 'Acme' });
analytics.alias('user-2');
analytics.setConsent('marketing', false);
analytics.flush();
analytics.reset();
const stats: Stats = analytics.stats();
const pending: number = stats.pending + stats.dropped['evicted'];
const anonymous: string = analytics.anonymousId;
analytics.registerPushSubscription({ endpoint: 'https://push.example', keys: { p256dh: 'k', auth: 'a' } });
console.log(id, pending, anonymous);

// @ts-expect-error: properties must be JSON, not a function
analytics.track('Bad', { f: () => 1 });
// @ts-expect-error: the write key is required
new Analytics({ endpoint: 'https://collector.example.com' });
