"""The SDL of `/v0/gql`: a subset of Inngest's dev server schema (inngest/inngest,
`pkg/coreapi/gql.*.graphql`), with its type, field and argument names and nullability, so a
query written for Inngest's dev server works here unchanged (and one that works here works
there). Fields devserver has no data for are left out rather than answered with made-up
values; asking for one is a validation error naming the field.
"""

from __future__ import annotations

SDL = """
scalar Time
scalar ULID
scalar UUID
scalar Bytes
scalar Map

type Query {
  stream(query: StreamQuery!): [StreamItem!]!
  event(query: EventQuery!): Event
  events(query: EventsQuery!): [Event!]
  eventV2(id: ULID!): EventV2!
  functionBySlug(query: FunctionQuery!): Function
  functions: [Function!]
  run(runID: String!): FunctionRunV2
  runTraceSpanOutputByID(outputID: String!): RunTraceSpanOutput!
  runTrigger(runID: String!): RunTraceTrigger!
  runTrace(runID: String!): RunTraceSpan!
}

input FunctionQuery {
  workspaceId: ID! = "local"
  functionSlug: String!
}

input EventQuery {
  workspaceId: ID! = "local"
  eventId: ID!
}

input EventsQuery {
  workspaceId: ID! = "local"
  lastEventId: ID
}

input StreamQuery {
  after: ID
  before: ID
  limit: Int! = 20
  includeInternalEvents: Boolean
}

enum StreamType {
  EVENT
  CRON
}

type StreamItem {
  id: ID!
  trigger: String!
  type: StreamType!
  createdAt: Time!
  runs: [FunctionRun]
  inBatch: Boolean!
}

type Event {
  id: ULID!
  externalID: String
  name: String
  createdAt: Time
  payload: String
  totalRuns: Int
  raw: String
  functionRuns: [FunctionRun!]
}

type EventSource {
  name: String
}

type EventV2 {
  id: ULID!
  idempotencyKey: String
  name: String!
  occurredAt: Time!
  receivedAt: Time!
  raw: String!
  version: String
  source: EventSource
  runs: [FunctionRunV2!]!
}

enum FunctionTriggerTypes {
  EVENT
  CRON
}

type FunctionTrigger {
  type: FunctionTriggerTypes!
  value: String!
}

type Function {
  id: String!
  name: String!
  slug: String!
  triggers: [FunctionTrigger!]
  url: String!
  appID: String!
}

enum FunctionRunStatus {
  COMPLETED
  FAILED
  CANCELLED
  RUNNING
  QUEUED
}

type FunctionRun {
  id: ID!
  functionID: String!
  function: Function
  status: FunctionRunStatus
  startedAt: Time
  finishedAt: Time
  output: String
  eventID: ID!
}

type FunctionRunV2 {
  id: ULID!
  functionID: UUID!
  function: Function!
  traceID: String!
  queuedAt: Time!
  startedAt: Time
  endedAt: Time
  status: FunctionRunStatus!
  triggerIDs: [ULID!]!
  eventName: String
  isBatch: Boolean!
  output: Bytes
  trace(preview: Boolean): RunTraceSpan
}

enum RunTraceSpanStatus {
  FAILED
  QUEUED
  RUNNING
  COMPLETED
  WAITING
  CANCELLED
}

enum StepOp {
  INVOKE
  RUN
  SLEEP
  WAIT_FOR_EVENT
  AI_GATEWAY
}

type SpanMetadata {
  scope: String!
  kind: String!
  values: Map!
  updatedAt: Time!
}

type RunTraceSpan {
  functionID: UUID!
  runID: ULID!
  spanID: String!
  traceID: String!
  name: String!
  status: RunTraceSpanStatus!
  attempts: Int
  duration: Int
  outputID: String
  queuedAt: Time!
  startedAt: Time
  endedAt: Time
  childrenSpans: [RunTraceSpan!]!
  stepOp: StepOp
  stepID: String
  stepType: String
  isRoot: Boolean!
  parentSpanID: String
  isUserland: Boolean!
  metadata: [SpanMetadata!]!
}

type StepError {
  message: String!
  name: String
  stack: String
  cause: Map
}

type RunTraceSpanOutput {
  input: Bytes
  data: Bytes
  error: StepError
}

type RunTraceTrigger {
  eventName: String
  IDs: [ULID!]!
  payloads: [Bytes!]!
  timestamp: Time!
  isBatch: Boolean!
  batchID: ULID
  cron: String
}
"""
