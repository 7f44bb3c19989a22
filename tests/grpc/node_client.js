// Drives the official RocketMQ 5 Node.js client (rocketmq-client-nodejs) against a txmq
// broker's gRPC endpoint, for txmq's black-box tests. One JSON object per line.
//
//     node node_client.js ENDPOINT TOPIC GROUP COUNT
//         sends COUNT messages to TOPIC, then a SimpleConsumer of GROUP receives and
//         acks COUNT
//     node node_client.js ENDPOINT txn TOPIC
//         commits node-commit, rolls back node-rollback, and leaves node-checked open
//         for its checker, which answers COMMIT when the broker checks back
const { Producer, SimpleConsumer } = require('rocketmq-client-nodejs');

const COMMIT = 1;
const ROLLBACK = 2;

async function txn(endpoints, topic) {
  let checked;
  const wasChecked = new Promise((resolve) => { checked = resolve; });
  const checker = {
    async check(message) {
      const body = message.body.toString();
      console.log(JSON.stringify({ checked: body, transactionId: message.transactionId }));
      checked();
      return body === 'node-checked' ? COMMIT : ROLLBACK;
    },
  };
  const producer = new Producer({ endpoints, namespace: '', topics: [topic], checker });
  await producer.startup();
  for (const [body, end] of [['node-commit', 'commit'], ['node-rollback', 'rollback']]) {
    const tx = producer.beginTransaction();
    const r = await producer.send({ topic, body: Buffer.from(body) }, tx);
    await (end === 'commit' ? tx.commit() : tx.rollback());
    console.log(JSON.stringify({ ended: body, how: end, transactionId: r.transactionId }));
  }
  const tx = producer.beginTransaction();
  const r = await producer.send({ topic, body: Buffer.from('node-checked') }, tx);
  console.log(JSON.stringify({ open: 'node-checked', transactionId: r.transactionId }));
  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no check-back in 60 s')), 60000));
  await Promise.race([wasChecked, timeout]);
  // The answer goes out after check() returns.
  await new Promise((resolve) => setTimeout(resolve, 3000));
  process.exit(0);
}

async function main() {
  if (process.argv[3] === 'txn') {
    return txn(process.argv[2], process.argv[4]);
  }
  const [endpoints, topic, group, count] = process.argv.slice(2);
  const n = Number(count);
  const producer = new Producer({ endpoints, namespace: '', topics: [topic] });
  await producer.startup();
  for (let i = 0; i < n; i++) {
    const r = await producer.send({ topic, tag: 'node', keys: [`k${i}`], body: Buffer.from(`node-${i}`) });
    console.log(JSON.stringify({ sent: `node-${i}`, messageId: r.messageId }));
  }
  const consumer = new SimpleConsumer({
    consumerGroup: group,
    endpoints,
    namespace: '',
    subscriptions: new Map().set(topic, '*'),
    awaitDuration: 3000,
  });
  await consumer.startup();
  let got = 0;
  const deadline = Date.now() + 60000;
  while (got < n && Date.now() < deadline) {
    for (const m of await consumer.receive(16, 10000)) {
      console.log(JSON.stringify({ received: m.body.toString(), messageId: m.messageId, attempt: m.deliveryAttempt }));
      await consumer.ack(m);
      got++;
    }
  }
  process.exit(got === n ? 0 : 1);
}

main().catch((e) => { console.error('FAILED', e); process.exit(1); });
