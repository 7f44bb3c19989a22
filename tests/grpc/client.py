"""Drives the official RocketMQ 5 Python client (rocketmq-python-client) against a txmq
broker's gRPC endpoint, for txmq's black-box tests. Every command prints one JSON
object per line on stdout; the client's own logs go to stderr.

    client.py ENDPOINT produce TOPIC COUNT [--key K] [--tag T] [--group G] [--delay-ms MS]
        [--prefix P]
    client.py ENDPOINT txn TOPIC BODY commit|rollback
    client.py ENDPOINT txn-check TOPIC BODY commit|rollback
        (leaves the transaction open; its checker answers the broker's check-back)
    client.py ENDPOINT simple GROUP TOPIC COUNT [--invisible S] [--hold BODY]
        [--change BODY:SECONDS] [--wait S]
        (a SimpleConsumer receives COUNT messages, acking each, except: --hold leaves
        the message with that body unacked (it comes back after the invisible time),
        --change moves that message's invisible time once)
    client.py ENDPOINT push GROUP TOPIC SUCCESSES [--fail-once BODY] [--always-fail BODY]
        [--slow BODY:SECONDS] [--wait S]
        (a PushConsumer consumes until SUCCESSES messages succeeded; its listener fails
        the first delivery of --fail-once and every delivery of --always-fail)
    client.py ENDPOINT torture-produce TOPIC PREFIX
        (sends PREFIX0, PREFIX1, … until killed, through broker restarts; prints each
        send the broker acknowledged, at once)
    client.py ENDPOINT torture-consume GROUP TOPIC
        (a SimpleConsumer that receives and acks until killed, through broker restarts;
        prints each delivery and each ack's outcome, at once; a body ending in -poison
        is never acked)
    client.py ENDPOINT torture-short-polls GROUP TOPIC
        (the same with raw ReceiveMessage calls of 100 ms long polls: a receive often
        returns while the broker's queue is reading for it)
    client.py ENDPOINT recall TOPIC
        (sends a message delayed an hour, then recalls it)
    client.py ENDPOINT hostile
        (raw calls with bad input; prints each call's status code)
    client.py ENDPOINT cancel-receive GROUP TOPIC
        (a raw ReceiveMessage long poll, cancelled by the client after a second)
"""

import json
import os
import sys
import time

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials,
                      FilterExpression, Message, MessageListener, Producer,
                      PushConsumer, SimpleConsumer, TransactionChecker,
                      TransactionResolution)


# A receipt handle of txmq's form whose MAC is wrong: it names no lease, so a call with it
# is decided by everything else the broker checks first (permissions, durations).
FORGED = "txmq2.0.1." + "0" * 32


def out(**fields):
    print(json.dumps(fields), flush=True)


def tls():
    # TXMQ_TLS=1: a TLS channel (the server's certificate is trusted through grpc's
    # GRPC_DEFAULT_SSL_ROOTS_FILE_PATH).
    import os
    return os.environ.get("TXMQ_TLS") == "1"


def config(endpoint):
    # TXMQ_AK / TXMQ_SK: the access key and secret to sign requests with.
    import os
    credentials = Credentials(os.environ.get("TXMQ_AK", ""), os.environ.get("TXMQ_SK", ""))
    return ClientConfiguration(endpoint, credentials, request_timeout=5)


def message(topic, body, key=None, tag=None, group=None, deliver_at=None):
    m = Message()
    m.topic = topic
    m.body = body.encode()
    if key:
        m.keys = key
    if tag:
        m.tag = tag
    if group:
        m.message_group = group
    if deliver_at:
        m.delivery_timestamp = deliver_at
    return m


def option(args, name):
    if name in args:
        return args[args.index(name) + 1]
    return None


def produce(endpoint, topic, count, args):
    producer = Producer(config(endpoint), (topic,), tls_enable=tls())
    producer.startup()
    try:
        delay = option(args, "--delay-ms")
        for i in range(int(count)):
            # The Python client takes the delivery time in whole seconds (its
            # Timestamp's seconds): the next whole second at least `delay` ms ahead.
            deliver_at = -(-(int(time.time() * 1000) + int(delay)) // 1000) if delay else None
            prefix = option(args, "--prefix") or "py-"
            m = message(topic, f"{prefix}{i}", option(args, "--key"), option(args, "--tag"),
                        option(args, "--group"), deliver_at)
            receipt = producer.send(m)
            out(sent=i, message_id=receipt.message_id, offset=receipt.offset,
                deliver_at_ms=deliver_at * 1000 if deliver_at else None)
    finally:
        producer.shutdown()


class Never(TransactionChecker):
    """A checker that keeps every transaction unknown (the test ends it itself)."""

    def check(self, message):
        return TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED


def txn(endpoint, topic, body, end, then=None):
    """Ends a transaction as told; with `then`, ends it the other way after that and
    prints what the broker said, as an application would read it."""
    producer = Producer(config(endpoint), (topic,), Never())
    producer.startup()
    try:
        transaction = producer.begin_transaction()
        receipt = producer.send(message(topic, body), transaction)
        out(prepared=True, message_id=receipt.message_id,
            transaction_id=receipt.transaction_id)
        if end == "commit":
            transaction.commit()
        else:
            transaction.rollback()
        out(ended=end)
        if then:
            try:
                if then == "commit":
                    transaction.commit()
                else:
                    transaction.rollback()
                out(then=then, refused=None)
            except Exception as e:
                out(then=then, refused=str(e), code=int(getattr(e, "code", 0) or 0),
                    already_committed="already committed" in str(e),
                    already_rolled_back="already rolled back" in str(e))
    finally:
        producer.shutdown()


class Answer(TransactionChecker):
    """A checker that answers every check-back as told, and says so."""

    def __init__(self, answer, done):
        self.answer = answer
        self.done = done

    def check(self, message):
        out(checked=message.message_id, body=message.body.decode())
        self.done.set()
        if self.answer == "commit":
            return TransactionResolution.COMMIT
        if self.answer == "unknown":
            return TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED
        return TransactionResolution.ROLLBACK


def txn_check(endpoint, topic, body, answer):
    import threading
    done = threading.Event()
    producer = Producer(config(endpoint), (topic,), Answer(answer, done))
    producer.startup()
    try:
        transaction = producer.begin_transaction()
        receipt = producer.send(message(topic, body), transaction)
        out(prepared=True, message_id=receipt.message_id,
            transaction_id=receipt.transaction_id)
        if not done.wait(60):
            sys.exit("no check-back came within 60 s")
        # The answer goes out on the checker's thread after check() returns.
        time.sleep(3)
    finally:
        producer.shutdown()


def simple(endpoint, group, topic, count, args):
    invisible = int(option(args, "--invisible") or 30)
    hold = option(args, "--hold")
    change = option(args, "--change")
    wait = float(option(args, "--wait") or 60)
    consumer = SimpleConsumer(config(endpoint), group, {topic: FilterExpression()}, 5)
    consumer.startup()
    try:
        received = 0
        held = changed = False
        first = {}
        deadline = time.time() + wait
        while received < int(count):
            if time.time() > deadline:
                sys.exit(f"received {received} of {count} within {wait} s")
            # Before the receive: no lease it makes starts earlier.
            asked_ms = int(time.time() * 1000)
            for m in consumer.receive(16, invisible):
                body = m.body.decode()
                out(body=body, message_id=m.message_id, attempt=m.delivery_attempt,
                    asked_ms=asked_ms, at_ms=int(time.time() * 1000))
                received += 1
                if hold == body and not held:
                    held = True
                    first[body] = m
                    continue
                if body in first:
                    # The first delivery's handle is stale after the redelivery.
                    try:
                        consumer.ack(first.pop(body))
                        out(stale_ack=body, refused=False)
                    except Exception as e:
                        out(stale_ack=body, refused=True, error=str(e)[:200])
                if change and change.split(":")[0] == body and not changed:
                    changed = True
                    # Before the change: its new invisible time starts no earlier.
                    out(changed=body, at_ms=int(time.time() * 1000))
                    consumer.change_invisible_duration(m, int(change.split(":")[1]))
                    continue
                consumer.ack(m)
    finally:
        consumer.shutdown()


class Listener(MessageListener):
    """Succeeds, except as told; reports every delivery."""

    def __init__(self, fail_once, always_fail, successes, done, slow=None):
        import threading
        self.slow = slow
        self.fail_once = fail_once
        self.always_fail = always_fail
        self.failed = set()
        self.successes = 0
        self.target = successes
        self.done = done
        self.lock = threading.Lock()

    def consume(self, message):
        body = message.body.decode()
        if self.slow and self.slow.split(":")[0] == body:
            # Longer than the broker's lease: only its renewals keep it ours.
            time.sleep(float(self.slow.split(":")[1]))
        with self.lock:
            fail = body == self.always_fail or (
                body == self.fail_once and body not in self.failed)
            if fail:
                self.failed.add(body)
            else:
                self.successes += 1
                if self.successes >= self.target:
                    self.done.set()
            out(body=body, attempt=message.delivery_attempt, ok=not fail,
                group=message.message_group, at_ms=int(time.time() * 1000))
        return ConsumeResult.FAILURE if fail else ConsumeResult.SUCCESS


def push(endpoint, group, topic, successes, args):
    import threading
    done = threading.Event()
    listener = Listener(option(args, "--fail-once"), option(args, "--always-fail"),
                        int(successes), done, option(args, "--slow"))
    consumer = PushConsumer(config(endpoint), group, listener, {topic: FilterExpression()})
    consumer.startup()
    try:
        if not done.wait(float(option(args, "--wait") or 60)):
            sys.exit(f"only {listener.successes} of {successes} succeeded")
        # The last acks go out after consume() returns.
        time.sleep(1)
    finally:
        consumer.shutdown()


def cancel_receive(endpoint, group, topic):
    import threading

    import grpc
    from google.protobuf.duration_pb2 import Duration
    from rocketmq.grpc_protocol.definition_pb2 import MessageQueue, Resource
    from rocketmq.grpc_protocol.service_pb2 import ReceiveMessageRequest
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    channel = grpc.insecure_channel(endpoint)
    stub = MessagingServiceStub(channel)
    req = ReceiveMessageRequest(
        group=Resource(name=group),
        message_queue=MessageQueue(topic=Resource(name=topic)),
        batch_size=1,
        invisible_duration=Duration(seconds=10),
        long_polling_timeout=Duration(seconds=15),
    )
    call = stub.ReceiveMessage(req, metadata=[("x-mq-client-id", "cancel-test")])
    threading.Timer(1.0, call.cancel).start()
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        out(cancelled=e.code() == grpc.StatusCode.CANCELLED)
    channel.close()


def short_polls(endpoint, group, topic, seconds):
    """Raw ReceiveMessage calls with 100 ms long polls, acking what each returns, for
    `seconds` (reconnecting through broker restarts): a receive often returns while the
    broker's queue is reading for it. Prints each acked body."""
    import grpc
    from google.protobuf.duration_pb2 import Duration
    from rocketmq.grpc_protocol import definition_pb2 as d
    from rocketmq.grpc_protocol import service_pb2 as s
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    die_with_parent()
    meta = [("x-mq-client-id", "short-polls")]
    end = time.time() + float(seconds)
    channel = None
    while time.time() < end:
        try:
            if channel is None:
                channel = grpc.insecure_channel(endpoint)
                stub = MessagingServiceStub(channel)
            req = s.ReceiveMessageRequest(
                group=d.Resource(name=group),
                message_queue=d.MessageQueue(topic=d.Resource(name=topic)),
                batch_size=4, invisible_duration=Duration(seconds=2),
                long_polling_timeout=Duration(nanos=100_000_000))
            got = [r.message for r in stub.ReceiveMessage(req, metadata=meta, timeout=5)
                   if r.HasField("message")]
            for m in got:
                entry = s.AckMessageEntry(message_id=m.system_properties.message_id,
                                          receipt_handle=m.system_properties.receipt_handle)
                r = stub.AckMessage(s.AckMessageRequest(
                    group=d.Resource(name=group), topic=d.Resource(name=topic),
                    entries=[entry]), metadata=meta, timeout=5)
                if r.status.code == 20000 and all(e.status.code == 20000 for e in r.entries):
                    out(acked=m.body.decode())
        except Exception:
            if channel is not None:
                channel.close()
            channel = None
            time.sleep(0.2)


def hostile(endpoint):
    import grpc
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.timestamp_pb2 import Timestamp
    from rocketmq.grpc_protocol import definition_pb2 as d
    from rocketmq.grpc_protocol import service_pb2 as s
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    stub = MessagingServiceStub(grpc.insecure_channel(endpoint))
    meta = [("x-mq-client-id", "hostile-test")]

    def msg(topic="h", mid="0001", kind=d.NORMAL, body=b"x", group=None, at=None,
            encoding=d.IDENTITY):
        props = d.SystemProperties(message_id=mid, message_type=kind,
                                   body_encoding=encoding)
        if group:
            props.message_group = group
        if at:
            props.delivery_timestamp.CopyFrom(at)
        return d.Message(topic=d.Resource(name=topic), system_properties=props, body=body)

    def send(*messages):
        r = stub.SendMessage(s.SendMessageRequest(messages=list(messages)), metadata=meta)
        return r.status.code

    far = Timestamp(seconds=int(time.time()) + 60 * 86400)
    out(call="empty send", code=send())
    out(call="bad topic name", code=send(msg(topic="bad name!")))
    out(call="no message id", code=send(msg(mid="")))
    out(call="fifo without group", code=send(msg(kind=d.FIFO)))
    out(call="body too large", code=send(msg(body=b"x" * (5 << 20))))
    out(call="delay too far", code=send(msg(kind=d.DELAY, at=far)))
    end = lambda txn, res: stub.EndTransaction(s.EndTransactionRequest(  # noqa: E731
        topic=d.Resource(name="h"), transaction_id=txn, resolution=res,
        source=d.SOURCE_CLIENT), metadata=meta).status.code
    out(call="end malformed txn", code=end("xyz", d.COMMIT))
    out(call="end unknown txn", code=end("0" * 32, d.COMMIT))
    r = stub.SendMessage(s.SendMessageRequest(messages=[msg(kind=d.TRANSACTION)]), metadata=meta)
    txn = r.entries[0].transaction_id
    out(call="rollback", code=end(txn, d.ROLLBACK))
    out(call="commit after rollback", code=end(txn, d.COMMIT))
    ack = stub.AckMessage(s.AckMessageRequest(
        group=d.Resource(name="g"), topic=d.Resource(name="h"),
        entries=[s.AckMessageEntry(message_id="1", receipt_handle="forged")]), metadata=meta)
    out(call="ack forged handle", code=ack.entries[0].status.code)
    change = stub.ChangeInvisibleDuration(s.ChangeInvisibleDurationRequest(
        group=d.Resource(name="g"), topic=d.Resource(name="h"), receipt_handle=FORGED,
        invisible_duration=Duration(seconds=13 * 3600)), metadata=meta)
    out(call="invisible 13 h", code=change.status.code)

    def receive(**kw):
        req = s.ReceiveMessageRequest(group=d.Resource(name="g"),
                                      message_queue=d.MessageQueue(topic=d.Resource(name="h")),
                                      batch_size=1, long_polling_timeout=Duration(seconds=1), **kw)
        for r in stub.ReceiveMessage(req, metadata=meta):
            return r.status.code
    out(call="receive invisible 0.5 s", code=receive(invisible_duration=Duration(nanos=500_000_000)))
    out(call="receive sql filter", code=receive(
        invisible_duration=Duration(seconds=10),
        filter_expression=d.FilterExpression(type=d.SQL, expression="a > 1")))
    route = stub.QueryRoute(s.QueryRouteRequest(topic=d.Resource(name="")), metadata=meta)
    out(call="route without topic", code=route.status.code)
    out(call="a good send after all that", code=send(msg(mid="0002")))
    import gzip
    out(call="gzip body", code=send(msg(topic="hz", mid="0005",
                                        body=gzip.compress(b"zipped" * 2000),
                                        encoding=d.GZIP)))
    out(call="bad gzip body", code=send(msg(topic="hz", mid="0006", body=b"not gzip",
                                            encoding=d.GZIP)))
    # A client's retry keeps its message id and content: stored once, the first receipt
    # again. The same id with other content, or from another client (two containerised
    # producers make the same ids), is another message: stored.
    offsets = []
    codes = []
    for body, client in ((b"first", "hostile-test"), (b"first", "hostile-test"),
                         (b"other", "hostile-test"), (b"first", "hostile-test-2")):
        r = stub.SendMessage(s.SendMessageRequest(messages=[msg(mid="0003", body=body)]),
                             metadata=[("x-mq-client-id", client)])
        offsets.append(r.entries[0].offset)
        codes.append(r.status.code)
    out(call="the same message id again", code=max(codes), offsets=offsets)


def signed_meta(client_id):
    """Call metadata for `client_id`, signed with TXMQ_AK/TXMQ_SK as the clients sign
    (unsigned when TXMQ_AK is empty)."""
    import hashlib
    import hmac as hmac_mod
    ak, sk = os.environ.get("TXMQ_AK", ""), os.environ.get("TXMQ_SK", "")
    m = [("x-mq-client-id", client_id)]
    if ak:
        # UTC here (Node.js's form); the others send local time.
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        sig = hmac_mod.new(sk.encode(), date.encode(), hashlib.sha1).hexdigest()
        m += [("x-mq-date-time", date),
              ("authorization", f"MQv2-HMAC-SHA1 Credential={ak}, "
                                f"SignedHeaders=x-mq-date-time, Signature={sig}")]
    return m


def telemetry_wait(endpoint, topic, seconds):
    """Opens a raw Telemetry stream as a producer of `topic` (signed as `ops` signs),
    prints `settled` once the broker answers its Settings, then how the stream ends
    within `seconds`: closed by the broker (with the status it sent) or still open."""
    import queue
    import threading
    import grpc
    from rocketmq.grpc_protocol import definition_pb2 as d
    from rocketmq.grpc_protocol import service_pb2 as s
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    stub = MessagingServiceStub(grpc.insecure_channel(endpoint))
    settings = d.Settings(client_type=d.PRODUCER, publishing=d.Publishing(
        topics=[d.Resource(name=topic)]))
    stop = threading.Event()

    def commands():
        yield s.TelemetryCommand(settings=settings)
        stop.wait(float(seconds) + 5)

    replies = queue.Queue()

    def read():
        try:
            for r in stub.Telemetry(commands(), metadata=signed_meta("telemetry-wait")):
                replies.put(("reply", r.status.code))
            replies.put(("end", 0))
        except grpc.RpcError as e:
            replies.put(("error", e.code().name))
    threading.Thread(target=read, daemon=True).start()
    first = replies.get(timeout=30)
    out(settled=first[0] == "reply", code=first[1])
    sys.stdout.flush()
    try:
        kind, code = replies.get(timeout=float(seconds))
        out(closed=True, kind=kind, code=code)
    except queue.Empty:
        out(closed=False)
    stop.set()


def steal(endpoint, group, topic):
    """Receives one message as client `owner`, then uses its receipt handle as client
    `thief` (ack, change invisible), a neighbour's handle made from it (the next lease
    id, the same MAC), and finally as `owner`: a line with each call's status code."""
    import grpc
    from google.protobuf.duration_pb2 import Duration
    from rocketmq.grpc_protocol import definition_pb2 as d
    from rocketmq.grpc_protocol import service_pb2 as s
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    stub = MessagingServiceStub(grpc.insecure_channel(endpoint))
    g, t = d.Resource(name=group), d.Resource(name=topic)
    props = d.SystemProperties(message_id="steal-0001", message_type=d.NORMAL,
                               body_encoding=d.IDENTITY)
    stub.SendMessage(s.SendMessageRequest(messages=[d.Message(
        topic=t, system_properties=props, body=b"mine")]), metadata=signed_meta("owner"))
    handle = None
    req = s.ReceiveMessageRequest(group=g, message_queue=d.MessageQueue(topic=t),
                                  batch_size=1, invisible_duration=Duration(seconds=30),
                                  long_polling_timeout=Duration(seconds=10))
    for r in stub.ReceiveMessage(req, metadata=signed_meta("owner")):
        if r.HasField("message"):
            handle = r.message.system_properties.receipt_handle
    out(received=handle is not None)

    def ack(h, client):
        r = stub.AckMessage(s.AckMessageRequest(group=g, topic=t, entries=[
            s.AckMessageEntry(message_id="steal-0001", receipt_handle=h)]),
            metadata=signed_meta(client))
        return r.entries[0].status.code

    out(call="thief ack", code=ack(handle, "thief"))
    change = stub.ChangeInvisibleDuration(s.ChangeInvisibleDurationRequest(
        group=g, topic=t, receipt_handle=handle, invisible_duration=Duration(seconds=43200)),
        metadata=signed_meta("thief"))
    out(call="thief change", code=change.status.code)
    prefix, offset, lease, mac = handle.split(".")
    neighbour = ".".join([prefix, offset, str(int(lease) + 1), mac])
    out(call="neighbour ack", code=ack(neighbour, "owner"))
    out(call="owner ack", code=ack(handle, "owner"))


def flood(endpoint, topic, count, size):
    """`count` SendMessage calls at once, each of a `size`-byte body (one shared bytes
    object), on one channel: a line with how many ended with each status code (or gRPC
    error)."""
    import collections
    import grpc
    from rocketmq.grpc_protocol import definition_pb2 as d
    from rocketmq.grpc_protocol import service_pb2 as s
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    limit = int(size) + (1 << 20)
    channel = grpc.insecure_channel(endpoint, options=[
        ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
    stub = MessagingServiceStub(channel)
    body = b"x" * int(size)
    calls = []
    for i in range(int(count)):
        props = d.SystemProperties(message_id=f"flood-{i:04}", message_type=d.NORMAL,
                                   body_encoding=d.IDENTITY)
        m = d.Message(topic=d.Resource(name=topic), system_properties=props, body=body)
        calls.append(stub.SendMessage.future(s.SendMessageRequest(messages=[m]),
                                             metadata=[("x-mq-client-id", "flood")],
                                             timeout=300))
    codes = collections.Counter()
    for c in calls:
        try:
            codes[str(c.result().status.code)] += 1
        except grpc.RpcError as e:
            codes[e.code().name] += 1
    out(codes=dict(codes))


def ops(endpoint, names):
    """Each named gRPC operation once, raw, signed with TXMQ_AK/TXMQ_SK (unsigned when
    TXMQ_AK is empty): a line per operation with its status code, or the gRPC error
    code name when the call itself was refused (UNAUTHENTICATED)."""
    import grpc
    from google.protobuf.duration_pb2 import Duration
    from rocketmq.grpc_protocol import definition_pb2 as d
    from rocketmq.grpc_protocol import service_pb2 as s
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    stub = MessagingServiceStub(grpc.insecure_channel(endpoint))

    def meta():
        return signed_meta("permission-test")

    def msg(kind=d.NORMAL, topic="t1"):
        props = d.SystemProperties(message_id="p-0001", message_type=kind,
                                   body_encoding=d.IDENTITY)
        return d.Message(topic=d.Resource(name=topic), system_properties=props, body=b"x")

    def first_status(stream):
        for r in stream:
            return r.status.code

    g, t = d.Resource(name="g1"), d.Resource(name="t1")

    def prepare_id():
        r = stub.SendMessage(s.SendMessageRequest(messages=[msg(d.TRANSACTION)]),
                             metadata=meta())
        out(op="PrepareId", code=r.status.code, txn=r.entries[0].transaction_id)
        return r.status.code

    calls = {
        # Prepares a transaction on t1 and prints its id too.
        "PrepareId": prepare_id,
        # Commits the transaction TXMQ_TXN names, as this client's own end.
        "CommitThat": lambda: stub.EndTransaction(s.EndTransactionRequest(
            topic=t, transaction_id=os.environ["TXMQ_TXN"], resolution=d.COMMIT,
            source=d.SOURCE_CLIENT), metadata=meta()).status.code,
        "Send": lambda: stub.SendMessage(
            s.SendMessageRequest(messages=[msg()]), metadata=meta()).status.code,
        "Prepare": lambda: stub.SendMessage(
            s.SendMessageRequest(messages=[msg(d.TRANSACTION)]), metadata=meta()).status.code,
        "EndTxn": lambda: stub.EndTransaction(s.EndTransactionRequest(
            topic=t, transaction_id="0" * 28 + "abcd", resolution=d.ROLLBACK,
            source=d.SOURCE_CLIENT), metadata=meta()).status.code,
        "Recall": lambda: stub.RecallMessage(s.RecallMessageRequest(
            topic=t, recall_handle="0" * 28 + "abcd"), metadata=meta()).status.code,
        "Route": lambda: stub.QueryRoute(
            s.QueryRouteRequest(topic=t), metadata=meta()).status.code,
        "Subscribe": lambda: first_status(stub.ReceiveMessage(s.ReceiveMessageRequest(
            group=g, message_queue=d.MessageQueue(topic=t), batch_size=1,
            invisible_duration=Duration(seconds=10),
            long_polling_timeout=Duration(seconds=1)), metadata=meta())),
        "Ack": lambda: stub.AckMessage(s.AckMessageRequest(group=g, topic=t, entries=[
            s.AckMessageEntry(message_id="1", receipt_handle=FORGED)]),
            metadata=meta()).entries[0].status.code,
        "Extend": lambda: stub.ChangeInvisibleDuration(s.ChangeInvisibleDurationRequest(
            group=g, topic=t, receipt_handle=FORGED,
            invisible_duration=Duration(seconds=10)), metadata=meta()).status.code,
        "DeadLetter": lambda: stub.ForwardMessageToDeadLetterQueue(
            s.ForwardMessageToDeadLetterQueueRequest(
                group=g, topic=t, receipt_handle=FORGED, message_id="1",
                delivery_attempt=1, max_delivery_attempts=1), metadata=meta()).status.code,
    }
    for name in names:
        if name not in calls:
            out(op=name, face="none")
            continue
        try:
            out(op=name, code=calls[name]())
        except grpc.RpcError as e:
            out(op=name, rpc=e.code().name)


def die_with_parent():
    """Dies with the thread that started it (a test that panics leaves no driver)."""
    import ctypes
    import signal
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def torture_produce(endpoint, topic, prefix):
    die_with_parent()
    producer = None
    while producer is None:
        try:
            producer = Producer(config(endpoint), (topic,))
            producer.startup()
        except Exception:
            producer = None
            time.sleep(0.1)
    seq = 0
    while True:
        body = f"{prefix}{seq}"
        seq += 1
        try:
            producer.send(message(topic, body))
            out(acked=body)
        except Exception:
            time.sleep(0.05)


def torture_consume(endpoint, group, topic):
    die_with_parent()
    consumer = None
    while consumer is None:
        try:
            consumer = SimpleConsumer(config(endpoint), group, {topic: FilterExpression()}, 2)
            consumer.startup()
        except Exception:
            consumer = None
            time.sleep(0.1)
    while True:
        try:
            messages = consumer.receive(16, 5)
        except Exception:
            time.sleep(0.05)
            continue
        for m in messages:
            body = m.body.decode()
            out(delivered=body, attempt=m.delivery_attempt, handle=m.receipt_handle)
            if body.endswith("-poison"):
                continue
            try:
                consumer.ack(m)
                out(acked=body, handle=m.receipt_handle)
            except Exception as e:
                out(ack_failed=body, error=str(e)[:200])


def torture_short_polls(endpoint, group, topic):
    import grpc
    from google.protobuf.duration_pb2 import Duration
    from rocketmq.grpc_protocol import definition_pb2 as d
    from rocketmq.grpc_protocol import service_pb2 as s
    from rocketmq.grpc_protocol.service_pb2_grpc import MessagingServiceStub
    die_with_parent()
    meta = [("x-mq-client-id", "torture-short-polls")]
    channel = None
    while True:
        try:
            if channel is None:
                channel = grpc.insecure_channel(endpoint)
                stub = MessagingServiceStub(channel)
            req = s.ReceiveMessageRequest(
                group=d.Resource(name=group),
                message_queue=d.MessageQueue(topic=d.Resource(name=topic)),
                batch_size=16, invisible_duration=Duration(seconds=2),
                long_polling_timeout=Duration(nanos=100_000_000))
            got = [r.message for r in stub.ReceiveMessage(req, metadata=meta, timeout=5)
                   if r.HasField("message")]
        except Exception:
            if channel is not None:
                channel.close()
            channel = None
            time.sleep(0.1)
            continue
        for m in got:
            body = m.body.decode()
            handle = m.system_properties.receipt_handle
            out(delivered=body, attempt=m.system_properties.delivery_attempt, handle=handle)
            if body.endswith("-poison"):
                continue
            entry = s.AckMessageEntry(message_id=m.system_properties.message_id,
                                      receipt_handle=handle)
            try:
                r = stub.AckMessage(s.AckMessageRequest(
                    group=d.Resource(name=group), topic=d.Resource(name=topic),
                    entries=[entry]), metadata=meta, timeout=5)
                if r.status.code == 20000 and all(e.status.code == 20000 for e in r.entries):
                    out(acked=body, handle=handle)
                else:
                    out(ack_failed=body, error=str(r.status.message)[:200])
            except Exception as e:
                out(ack_failed=body, error=str(e)[:200])


def recall(endpoint, topic):
    producer = Producer(config(endpoint), (topic,))
    producer.startup()
    try:
        m = message(topic, "recalled", deliver_at=int(time.time()) + 3600)
        receipt = producer.send(m)
        out(sent=receipt.message_id, recall_handle=receipt.recall_handle)
        out(recalled=producer.recall_message(topic, receipt.recall_handle))
        try:
            producer.recall_message(topic, receipt.recall_handle)
            out(again="ok")
        except Exception as e:
            out(again=str(e)[:200])
    finally:
        producer.shutdown()


def main():
    endpoint, command, *args = sys.argv[1:]
    if command == "produce":
        produce(endpoint, args[0], args[1], args[2:])
    elif command == "txn":
        txn(endpoint, args[0], args[1], args[2], args[3] if len(args) > 3 else None)
    elif command == "torture-produce":
        torture_produce(endpoint, args[0], args[1])
    elif command == "torture-consume":
        torture_consume(endpoint, args[0], args[1])
    elif command == "torture-short-polls":
        torture_short_polls(endpoint, args[0], args[1])
    elif command == "recall":
        recall(endpoint, args[0])
    elif command == "hostile":
        hostile(endpoint)
    elif command == "cancel-receive":
        cancel_receive(endpoint, args[0], args[1])
    elif command == "push":
        push(endpoint, args[0], args[1], args[2], args[3:])
    elif command == "telemetry-wait":
        telemetry_wait(endpoint, args[0], args[1])
    elif command == "steal":
        steal(endpoint, args[0], args[1])
    elif command == "flood":
        flood(endpoint, args[0], args[1], args[2])
    elif command == "ops":
        ops(endpoint, args)
    elif command == "simple":
        simple(endpoint, args[0], args[1], args[2], args[3:])
    elif command == "short-polls":
        short_polls(endpoint, args[0], args[1], args[2])
    elif command == "txn-check":
        txn_check(endpoint, args[0], args[1], args[2])
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
