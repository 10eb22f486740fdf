"""Subscription delivery: the edge that reads the outbox (locator.core.outbox) and tells the
care records over HTTP (rest-hook), one deliverer per database at a time."""
