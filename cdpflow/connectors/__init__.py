"""Connectors: CRM exports and point-of-sale transactions as tracking-spec events.

    cdpflow import crm customers.csv --mapping crm.yaml --to out/crm-events.jsonl
    cdpflow import pos receipts.jsonl --mapping pos.yaml --to kafka --bootstrap 127.0.0.1:9092

A mapping (YAML) names the columns that are identifiers and traits, and where the time is:

    source: store-crm                  # recorded as context.source.name
    timestamp: updated_at              # column with the row's time (ISO-8601, or a date)
    timezone: Europe/Berlin            # how a time without an offset is read (default UTC)
    identifiers:                       # identifier -> column
      user_id: customer_no             #   -> userId
      email: email                     #   -> traits.email
      phone: mobile                    #   -> traits.phone
      loyalty_id: card_no              #   -> context.externalIds (any other type too)
    traits: {first_name: fname, city: town, birthday: dob}   # trait -> column
    # pos only:
    order_id: receipt_no               # the transaction's id (its messageId derives from it)
    revenue: total                     # column with the amount
    currency: currency                 # column with the currency code, or
    default_currency: EUR              # the currency when there is no such column

A CRM row becomes an `identify` call, stamped (timestamp and receivedAt) with its own time; a POS row a `track` "Order Completed" with
`context.channel = pos`. Every event's messageId is derived from what it says (a CRM row's
source, identifiers, traits and time; a transaction's source and order id), so importing the same
file again produces the same messageIds and the pipeline drops the repeats as duplicates. Each
event passes the same schema validation and normalisation as tracked events; a row that does
not (or that a mapping column is missing from) becomes a dead letter with its row number, never
a silent drop.
"""
