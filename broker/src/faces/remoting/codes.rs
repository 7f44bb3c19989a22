//! The request and response codes RocketMQ clients use (`RequestCode`, `ResponseCode`).

#![allow(missing_docs)]

// Requests, client to broker.
pub const SEND_MESSAGE: i32 = 10;
pub const PULL_MESSAGE: i32 = 11;
pub const QUERY_MESSAGE: i32 = 12;
pub const QUERY_CONSUMER_OFFSET: i32 = 14;
pub const UPDATE_CONSUMER_OFFSET: i32 = 15;
pub const UPDATE_AND_CREATE_TOPIC: i32 = 17;
pub const GET_TOPIC_STATS_INFO: i32 = 202;
pub const GET_BROKER_RUNTIME_INFO: i32 = 28;
pub const SEARCH_OFFSET_BY_TIMESTAMP: i32 = 29;
pub const GET_MAX_OFFSET: i32 = 30;
pub const GET_MIN_OFFSET: i32 = 31;
pub const GET_EARLIEST_MSG_STORETIME: i32 = 32;
pub const VIEW_MESSAGE_BY_ID: i32 = 33;
pub const HEART_BEAT: i32 = 34;
pub const UNREGISTER_CLIENT: i32 = 35;
pub const CONSUMER_SEND_MSG_BACK: i32 = 36;
pub const END_TRANSACTION: i32 = 37;
pub const GET_CONSUMER_LIST_BY_GROUP: i32 = 38;
pub const LOCK_BATCH_MQ: i32 = 41;
pub const UNLOCK_BATCH_MQ: i32 = 42;
pub const CHECK_CLIENT_CONFIG: i32 = 46;
pub const PUT_KV_CONFIG: i32 = 100;
pub const GET_ROUTEINFO_BY_TOPIC: i32 = 105;
pub const GET_BROKER_CLUSTER_INFO: i32 = 106;
pub const UPDATE_AND_CREATE_SUBSCRIPTIONGROUP: i32 = 200;
pub const GET_ALL_SUBSCRIPTIONGROUP_CONFIG: i32 = 201;
pub const GET_CONSUMER_CONNECTION_LIST: i32 = 203;
pub const GET_ALL_TOPIC_LIST_FROM_NAMESERVER: i32 = 206;
pub const GET_CONSUME_STATS: i32 = 208;
pub const DELETE_TOPIC_IN_BROKER: i32 = 215;
pub const DELETE_TOPIC_IN_NAMESRV: i32 = 216;
pub const SEND_MESSAGE_V2: i32 = 310;
pub const SEND_BATCH_MESSAGE: i32 = 320;
pub const GET_TOPIC_CONFIG: i32 = 351;
pub const LITE_PULL_MESSAGE: i32 = 361;
pub const QUERY_ASSIGNMENT: i32 = 400;
pub const QUERY_TOPIC_CONSUME_BY_WHO: i32 = 300;

// Requests, broker to client (one-way).
pub const CHECK_TRANSACTION_STATE: i32 = 39;
pub const NOTIFY_CONSUMER_IDS_CHANGED: i32 = 40;

// Responses.
pub const SUCCESS: i32 = 0;
pub const SYSTEM_ERROR: i32 = 1;
pub const SYSTEM_BUSY: i32 = 2;
pub const REQUEST_CODE_NOT_SUPPORTED: i32 = 3;
pub const MESSAGE_ILLEGAL: i32 = 13;
pub const SERVICE_NOT_AVAILABLE: i32 = 14;
pub const NO_PERMISSION: i32 = 16;
pub const TOPIC_NOT_EXIST: i32 = 17;
pub const PULL_NOT_FOUND: i32 = 19;
pub const PULL_RETRY_IMMEDIATELY: i32 = 20;
pub const PULL_OFFSET_MOVED: i32 = 21;
pub const QUERY_NOT_FOUND: i32 = 22;
pub const SUBSCRIPTION_PARSE_FAILED: i32 = 23;
pub const SUBSCRIPTION_NOT_EXIST: i32 = 24;
pub const INVALID_PARAMETER: i32 = 29;
pub const CONSUMER_NOT_ONLINE: i32 = 206;
pub const FLOW_CONTROL: i32 = 215;
