"""HTTP push subscriptions: each event POSTed to a URL, signed with Standard Webhooks headers."""
