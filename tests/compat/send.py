"""Sends one of each Segment message type through a real client library, then flushes.

Usage: python send.py <segment|rudderstack> <collector url> <write key> <run id>
"""
import sys

library, url, write_key, run_id = sys.argv[1:5]
user_id = f"{library}-python-{run_id}"
anonymous_id = f"anon-{user_id}"
failures = []

if library == "segment":
    import segment.analytics as analytics

    analytics.write_key = write_key
    analytics.host = url
elif library == "rudderstack":
    import rudderstack.analytics as analytics

    analytics.write_key = write_key
    analytics.dataPlaneUrl = url
else:
    sys.exit(f"unknown library {library}")

analytics.max_retries = 1
analytics.on_error = lambda error, items: failures.append(error)

analytics.identify(user_id, {"email": "Ann@Example.com", "plan": "pro"}, anonymous_id=anonymous_id)
analytics.track(user_id, "Order Completed", {"total": 42.5, "currency": "EUR"})
analytics.page(user_id, name="Pricing", properties={"path": "/pricing"})
analytics.screen(user_id, name="Home")
analytics.group(user_id, "acme", {"name": "Acme"})
analytics.alias(anonymous_id, user_id)
analytics.flush()
analytics.shutdown()

if failures:
    sys.exit(f"{library} reported errors: {failures}")
print(f"sent 6 messages for {user_id}")
