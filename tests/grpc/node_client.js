// Drives the official RocketMQ 5 Node.js client (rocketmq-client-nodejs) against a txmq
// broker's gRPC endpoint, for txmq's black-box tests: sends COUNT messages to TOPIC,
// then a SimpleConsumer of GROUP receives and acks COUNT. One JSON object per line.
//
//     node node_client.js ENDPOINT TOPIC GROUP COUNT
const { Producer, SimpleConsumer } = require('rocketmq-client-nodejs');

async function main() {
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
