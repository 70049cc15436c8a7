"""The listener model: specs, kernel identity, binding, reconciliation and
accept-queue depth."""
